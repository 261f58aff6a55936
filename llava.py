"""Caption images with LLaVA-1.5, from llava-hf checkpoints or from the original LLaVA-1.5 checkpoints.

Both formats run as transformers' LlavaForConditionalGeneration. An original checkpoint
(liuhaotian/llava-v1.5-13b: LlavaLlamaForCausalLM, Llama weights plus model.mm_projector.*, the CLIP
vision tower named in `mm_vision_tower`) is converted at load time; nothing of the LLaVA repository is
needed. Images, prompt and token ids are prepared as LLaVA-1.5's own inference does: pad to a square
filled with the image-processor mean colour, CLIP preprocessing, the llava_v1 conversation, and
`tokenizer_image_token` (the prompt is split at the image and each piece tokenized on its own).

With several prompts, the vision tower runs once per image and the tokens its prompts share (system text, the
576 image tokens, the text before the question) are prefilled once per image; each (image, prompt) row then
prefills only its question and all rows decode together (utils/shared_prefix.py).
"""
import functools
import json
import os
import re

from PIL import Image

from utils.captioning import (Caption, UserError, by_image, generation_kwargs, inference_mode, run, stopped_at_limit,
                              stack_to_device)

# torch, transformers and huggingface_hub are imported where they are used: --help and mistakes answer at once.

# The llava_v1 conversation of llava/conversation.py (sep " ", sep2 "</s>"), for one user turn that
# starts with the image, as LLaVA-1.5's evaluation scripts build it: "<image>\n" + question.
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
# Llama config keys an original checkpoint carries for its language model.
LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
              "rope_scaling", "attention_bias", "bos_token_id", "eos_token_id", "pad_token_id",
              "tie_word_embeddings", "initializer_range")
# What an original config must say to be LLaVA-1.5: key -> (the original code's default, supported values).
LLAVA_15_SETTINGS = {"mm_projector_type": ("linear", ("mlp2x_gelu",)),
                     "mm_patch_merge_type": ("flat", ("flat",)),
                     "mm_use_im_start_end": (False, (False,)),
                     "mm_use_im_patch_token": (True, (False,)),
                     "mm_vision_select_feature": ("patch", ("patch", "cls_patch")),
                     "image_aspect_ratio": ("square", ("pad", "square"))}


def split_prompt(question):
    """The llava_v1 prompt as (text before the image, text after it).

    An `<image>` tag at the start or end of the question is dropped: the image already opens the user
    turn. One inside the text, as in the seed's "Describe the <image> in English in detail:", is read as
    the word "image"; the seed put the image there, mid-sentence and without any conversation."""
    question = re.sub(r"^\s*<image>\s*|\s*<image>\s*$", "", question).replace("<image>", "image")
    return f"{SYSTEM} USER: ", f"\n{question} ASSISTANT:"


def expand_to_square(image, fill):
    """LLaVA's expand2square: the image centred on a square canvas of its longer side."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def prepare_image(image, image_processor, pad):
    image = image.convert("RGB")
    if pad:
        # LLaVA fills with the processor mean as int(x * 255): (122, 116, 104) for CLIP
        image = expand_to_square(image, tuple(int(x * 255) for x in image_processor.image_mean))
    return image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def local_checkpoint(name_or_path, what):
    """A local folder for a folder path or a hub id (downloads configs, tokenizer and one weight format)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    import huggingface_hub
    patterns = ["*.json", "tokenizer.model"]
    try:
        files = huggingface_hub.list_repo_files(name_or_path)
        patterns.append("*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin")
        offline = False
    except Exception:  # no hub access: use what an earlier download left in the cache
        patterns += ["*.safetensors", "*.bin"]
        offline = True
    try:
        return huggingface_hub.snapshot_download(name_or_path, allow_patterns=patterns, local_files_only=offline)
    except Exception as error:
        raise UserError(f"{what} {name_or_path!r} is not a folder and could not be fetched from the hub: "
                        f"{type(error).__name__}") from error


def read_weights(folder):
    """All tensors of a checkpoint folder, safetensors or PyTorch pickles, sharded or not."""
    import safetensors.torch
    import torch
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.isfile(os.path.join(folder, index)):
            with open(os.path.join(folder, index)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(folder, single)):
            files = [single]
        else:
            continue
        paths = [os.path.join(folder, name) for name in files]
        if single.endswith(".safetensors"):
            return {k: v for path in paths for k, v in safetensors.torch.load_file(path).items()}
        return {k: v for path in paths
                for k, v in torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()}
    raise UserError(f"no model.safetensors or pytorch_model.bin (or their index) in {folder}")


def is_original_format(config):
    # model_type is "llava" in both formats (AutoConfig would silently build a default llava-hf
    # config from an original one), so tell them apart by the original's mm_* keys.
    return "mm_vision_tower" in config or "mm_projector_type" in config


def convert_original(folder, config, vision_tower):
    """LlavaConfig and native state dict for an original LLaVA-1.5 checkpoint plus its CLIP vision tower.

    The original has no `<image>` token: the native model gets one more embedding row (zeros; the image
    features replace it) at id = the original vocabulary size. Its output row is never generated."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    for key, (default, supported) in LLAVA_15_SETTINGS.items():
        if config.get(key, default) not in supported:
            raise UserError(f"{folder}: {key}={config.get(key, default)!r} is not LLaVA-1.5 "
                            f"(expected one of {supported})")
    vision_config = CLIPVisionConfig.from_pretrained(vision_tower)
    if config.get("mm_hidden_size", vision_config.hidden_size) != vision_config.hidden_size:
        raise UserError(f"vision tower {vision_tower} has hidden size {vision_config.hidden_size}, "
                        f"the checkpoint expects mm_hidden_size {config['mm_hidden_size']}")
    missing = [key for key in ("vocab_size", "hidden_size", "mm_vision_select_layer") if key not in config]
    if missing:
        raise UserError(f"{folder}/config.json lacks {', '.join(missing)}")
    vocab_size = config["vocab_size"]
    text_config = LlamaConfig(**{**{k: config[k] for k in LLAMA_KEYS if k in config}, "vocab_size": vocab_size + 1})
    llava_config = LlavaConfig(
        text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), image_token_index=vocab_size,
        vision_feature_layer=config["mm_vision_select_layer"], projector_hidden_act="gelu",
        vision_feature_select_strategy="full" if config.get("mm_vision_select_feature") == "cls_patch" else "default",
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        pad_token_id=config.get("pad_token_id"))

    projector = {"model.mm_projector.0.": "model.multi_modal_projector.linear_1.",
                 "model.mm_projector.2.": "model.multi_modal_projector.linear_2."}
    state = {}
    for key, value in read_weights(folder).items():
        if key.startswith("model.vision_tower.") or key.endswith(".rotary_emb.inv_freq"):
            continue  # LLaVA loads the tower from mm_vision_tower, whatever the checkpoint holds
        prefix = next((p for p in projector if key.startswith(p)), None)
        if prefix:
            state[projector[prefix] + key[len(prefix):]] = value
        elif key.startswith("model."):
            state["model.language_model." + key[len("model."):]] = value
        else:
            state[key] = value  # lm_head.weight
    embeddings = state["model.language_model.embed_tokens.weight"]
    state["model.language_model.embed_tokens.weight"] = torch.cat(
        [embeddings, embeddings.new_zeros(1, embeddings.shape[1])])
    lm_head = state["lm_head.weight"]
    state["lm_head.weight"] = torch.cat([lm_head, lm_head.new_zeros(1, lm_head.shape[1])])
    for key, value in read_weights(vision_tower).items():
        if key.startswith("vision_model.") and not key.endswith("position_ids"):
            state["model.vision_tower." + key[len("vision_model."):]] = value
    return llava_config, state


class LlavaCaptioner:
    name = "llava"
    default_model = "liuhaotian/llava-v1.5-13b"
    prompts = {"default": "Describe the <image> in English in detail:"}
    default_prompt = "default"
    # The seed sampled at temperature 0.2 (top_p None, one beam) with one image per call; 8 images per
    # call fit a 40 GB GPU with the 13B model in float16 (26 GB weights, ~0.6 GB of cache per image and prompt;
    # with several prompts, a batch that runs out of memory is split and retried).
    defaults = {"batch_size": 8, "temperature": 0.2}
    default_dtype = "float16"
    caption_flags = ("vision_tower",)
    refills_rows = True

    @staticmethod
    def add_arguments(parser):
        parser.epilog = (
            "--model takes a llava-hf checkpoint (LlavaForConditionalGeneration, e.g. llava-hf/llava-1.5-13b-hf) "
            "or an original LLaVA-1.5 one (LlavaLlamaForCausalLM with mm_* config keys, e.g. "
            "liuhaotian/llava-v1.5-13b, converted while loading; its CLIP tower comes from mm_vision_tower or "
            "--vision-tower). Every prompt becomes the user turn of LLaVA-1.5's llava_v1 conversation, after the "
            "image: '<system> USER: <image>\\n<prompt> ASSISTANT:'. A '<image>' tag at the start or end of a prompt "
            "is dropped; one inside it reads as the word 'image', so the default preset (the seed's 'Describe the "
            "<image> in English in detail:') asks 'Describe the image in English in detail:'. Images are padded to "
            "a square with the CLIP mean colour before the CLIP preprocessing, as LLaVA-1.5 does. Decoding "
            "defaults to the seed's sampling at temperature 0.2; --temperature 0 is greedy.")
        parser.add_argument(
            "--vision-tower", default=None, metavar="DIR",
            help="original-format checkpoints only: the CLIP vision tower (folder or hub id) instead of the "
                 "one the checkpoint names in mm_vision_tower (openai/clip-vit-large-patch14-336 for LLaVA-1.5)")

    def __init__(self, args, device):
        from transformers import AutoTokenizer, CLIPImageProcessorPil, LlamaTokenizer, LlavaForConditionalGeneration

        import utils.attention  # noqa: F401  (registers the sdpa_grouped attention implementation)
        folder = local_checkpoint(args.model, "checkpoint")
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise UserError(f"no config.json in {folder}")
        with open(config_path) as f:
            config = json.load(f)
        if is_original_format(config):
            vision_tower = local_checkpoint(args.vision_tower or config["mm_vision_tower"], "vision tower")
            llava_config, state = convert_original(folder, config, vision_tower)
            model, info = LlavaForConditionalGeneration.from_pretrained(
                None, config=llava_config, state_dict=state, dtype=args.dtype, device_map=device,
                attn_implementation=args.attn_implementation, output_loading_info=True)
            problems = [*info["missing_keys"], *info["unexpected_keys"], *info["mismatched_keys"]]
            if problems:
                raise UserError(f"{folder}: weights do not match LLaVA-1.5 (missing, unexpected or mismatched: "
                                f"{', '.join(map(str, problems[:5]))})")
            processor_folder = vision_tower
            # the original vocabulary has no image token: never generate it
            fixed_generation_kwargs = {"suppress_tokens": [llava_config.image_token_id]}
            pad = config.get("image_aspect_ratio") == "pad"
            # the class the original loads; AutoTokenizer, misled by model_type "llava", builds a generic
            # tokenizer without sentencepiece's dummy prefix
            tokenizer = LlamaTokenizer.from_pretrained(folder)
        elif "LlavaForConditionalGeneration" in config.get("architectures", []):
            if args.vision_tower:
                raise UserError("--vision-tower is for original-format checkpoints; "
                                f"{folder} is a llava-hf checkpoint with its own vision tower")
            model = LlavaForConditionalGeneration.from_pretrained(
                folder, dtype=args.dtype, device_map=device, attn_implementation=args.attn_implementation)
            processor_folder = folder
            fixed_generation_kwargs = {}
            pad = True  # llava-hf's LLaVA-1.5 conversions were all trained with image_aspect_ratio "pad"
            tokenizer = AutoTokenizer.from_pretrained(folder)
        else:
            raise UserError(f"{folder} is neither a llava-hf (LlavaForConditionalGeneration) nor an original "
                            "LLaVA-1.5 (mm_vision_tower in config.json) checkpoint")
        self.model = model.eval()
        self.device = device
        self.tokenizer = tokenizer
        self.generation = generation_kwargs(args, **fixed_generation_kwargs)
        self.decode_rows = args.decode_rows
        self.image_token_id = model.config.image_token_id
        vision = model.config.vision_config
        self.num_image_tokens = (vision.image_size // vision.patch_size) ** 2 + (
            model.config.vision_feature_select_strategy == "full")
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        self.prepare = functools.partial(prepare_image, image_processor=CLIPImageProcessorPil.from_pretrained(
            processor_folder), pad=pad)

    def prompt_ids(self, question):
        """The ids of the llava_v1 prompt as LLaVA's tokenizer_image_token makes them: BOS once, each side of
        the image tokenized on its own (so the text after the image starts with the dummy-prefix piece),
        the image placeholder expanded to the number of image features."""
        before, after = split_prompt(question)
        encode = functools.partial(self.tokenizer.encode, add_special_tokens=False)
        return [self.tokenizer.bos_token_id, *encode(before), *[self.image_token_id] * self.num_image_tokens,
                *encode(after)]

    def image_features(self, pixel_values):
        """One block of image features (image tokens x hidden size) per image, with the feature layer and
        selection of the config, as LlavaForConditionalGeneration's forward computes them."""
        config = self.model.config
        return self.model.get_image_features(
            pixel_values=pixel_values.to(self.device, self.model.dtype),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy).pooler_output

    @inference_mode
    def generate(self, pixel_values, prompt_ids):
        """Greedy or sampled captions of (image, prompt) rows, image-major. prompt_ids[i]: the prompt ids of
        image i's rows. The vision tower runs once per image; with several prompts per image, the tokens they
        share (system text, image, the text before the question) are prefilled once (utils/shared_prefix.py)."""
        from utils import shared_prefix
        output = shared_prefix.generate(
            self.model, prompt_ids, self.image_features(pixel_values), self.image_token_id, self.pad_token_id,
            self.decode_rows, eos_token_id=self.tokenizer.eos_token_id, **self.generation)
        new_tokens = output.tolist()  # generate() from embeddings returns only the new tokens; one copy to the CPU
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [Caption(text.strip(), stopped_at_limit(row, {self.tokenizer.eos_token_id}))
                for text, row in zip(texts, new_tokens)]

    def caption(self, images, prompts):
        ids = [self.prompt_ids(prompt) for prompt in prompts]
        # all (image, prompt) rows in one generate(): images x prompts sequences decode together
        return by_image(self.generate(stack_to_device(images, self.device), [ids] * len(images)), prompts)


if __name__ == "__main__":
    run(LlavaCaptioner)
