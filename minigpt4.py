"""MiniGPT-4 captions, from the original MiniGPT-4 files, without the MiniGPT-4 repository.

MiniGPT-4 is EVA ViT-g/14 (every block but the last) -> ln_vision -> BLIP-2 Q-Former with 32 query tokens ->
llama_proj -> Vicuna v0. The Llama-2 variant has no Q-Former: llama_proj maps each group of 4 neighbouring
patch features to one LLM embedding. The parts are transformers' Blip2VisionModel, Blip2QFormerModel and
LlamaForCausalLM (the LAVIS files converted while loading: convert/minigpt4.py); the weights come from the
files MiniGPT-4 users have:

    eva_vit_g.pth                    EVA ViT-g, LAVIS names (downloaded into the torch hub cache when missing there,
                                     as the original does; so is the Q-Former file)
    blip2_pretrained_flant5xxl.pth   Q-Former, query tokens and ln_vision, LAVIS names (or a BLIP-2 folder in
                                     transformers format, e.g. Salesforce/blip2-flan-t5-xxl, for ViT + Q-Former)
    pretrained_minigpt4*.pth         the MiniGPT-4 checkpoint: {"model": {llama_proj.*}}
    the LLM folder                   Vicuna v0 or Llama-2-chat in HF format, with sentencepiece's tokenizer.model

found through the original eval config (--cfg-path) or given by flags. Prompts, image processing, decoding
and answer cleaning follow the original's Chat (minigpt4/conversation/conversation.py).
"""
import argparse
import functools
import os
import re
from pathlib import Path

import sentencepiece
import torch
import torchvision.transforms.functional as TF
import yaml
from torch import nn
from transformers import (
    Blip2QFormerModel,
    Blip2VisionModel,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)

import utils.generation.attention  # noqa: F401  (registers the sdpa_grouped attention implementation)
from convert.minigpt4 import eva_vision_config, lavis_qformer_config, lavis_to_transformers, read_blip2_folder
from utils import prompts as presets
from utils.caption_loop import run
from utils.captioner import Caption, Captioner, by_image
from utils.checkpoints import download_file
from utils.errors import UserError
from utils.generation.tensors import HostCopy, stack_to_device, to_device_async

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The prompt the original Chat builds: CONV_VISION_*.copy(), upload_img (the image message), ask (the
# question joined to it with a space), answer (the empty assistant turn), get_prompt.
SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. "
    "You will be able to see the image once I provide it to you. Please answer my questions."
)
TEMPLATES = {
    "vicuna0": SYSTEM + "###Human: <Img><ImageHere></Img> {}###Assistant: ",  # CONV_VISION_Vicuna0
    "llama2": SYSTEM + "<s>[INST] <Img><ImageHere></Img> {} [/INST] ",  # CONV_VISION_LLama2
}
STOP = "###"  # the original stops on the ids of '###' and cuts the answer there
# Chat.answer's generation arguments (num_beams 1 is the loop's default), the original recaptioning script's
# temperature 0.5; its repetition_penalty of 1.05 is applied by RepetitionPenaltyWithBos below.
CHAT_GENERATION = {"temperature": 0.5, "top_p": 0.9, "min_length": 1, "length_penalty": 1.0}
REPETITION_PENALTY = 1.05
MAX_LENGTH = 2000  # Chat.answer keeps the last MAX_LENGTH - max_new_tokens context embeddings

EVA_FILE = "eva_vit_g.pth"
QFORMER_FILE = "blip2_pretrained_flant5xxl.pth"
# where the original downloads both files from (LAVIS' eva_vit.py, MiniGPT-4's default q_former_model);
# MINIGPT4_DOWNLOAD_URL replaces this folder, for a mirror (the tests point it at a local server)
LAVIS_URL = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/"
MODEL_CONFIGS = {"vicuna0": "minigpt4_vicuna0.yaml", "llama2": "minigpt4_llama2.yaml"}
PLACEHOLDER = "please set this value"  # what the original configs hold until the user edits them


def preprocess(image, size):
    """The original's blip2_image_eval processor, after the original scripts' convert('RGB')."""
    image = TF.resize(image.convert("RGB"), [size, size], interpolation=TF.InterpolationMode.BICUBIC)
    return TF.normalize(TF.to_tensor(image), CLIP_MEAN, CLIP_STD)


class SlowLlamaTokenizer:
    """The original's tokenizer, transformers 4.30's slow LlamaTokenizer, on sentencepiece itself: the special
    token strings in the text become their ids and every other piece of text is encoded on its own, with
    sentencepiece's dummy-prefix space. (Special tokens are taken to be AddedTokens without lstrip/rstrip,
    as Vicuna and Llama-2 folders declare them.)"""

    def __init__(self, path):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.special = {self.sp.id_to_piece(i): i for i in (self.sp.unk_id(), self.bos_id, self.eos_id)}
        self.special_split = re.compile("(" + "|".join(map(re.escape, self.special)) + ")")

    def encode(self, text, bos):
        ids = [self.bos_id] if bos else []
        for part in self.special_split.split(text):
            if part in self.special:
                ids.append(self.special[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids):
        """decode(skip_special_tokens=True)"""
        return self.sp.decode([i for i in ids if i not in self.special.values()])


class StopOnText(StoppingCriteria):
    """Ends a row once its text holds `stop`. The original stops on two id sequences of '###'; text after the
    first '###' is cut off either way, so the answers are the same.

    A row's text can come to hold `stop` only at a step whose token decodes to text with stop's last character
    (sentencepiece text grows piece by piece; '#' is one byte, so no byte-fallback sequence makes one late).
    Such tokens are marked once for the whole vocabulary, and only rows that just generated one are decoded:
    decoding every row at every step is slow on large batches (bench/RESULTS.md).

    The check runs one step late, so that it never waits for the GPU: each step's tokens (and which of them are
    marked) start their copy to the CPU, and the rows of the step before, whose copy has arrived by then, are
    checked. A row so ends one token after its text first holds `stop`, a token that answer() cuts off."""

    def __init__(self, tokenizer, stop, vocab_size, device):
        """vocab_size: the language model's, which may have ids past the tokenizer's pieces (never marked)."""
        self.tokenizer, self.stop = tokenizer, stop
        pieces = tokenizer.sp.get_piece_size()
        self.may_end_text = torch.tensor([i < pieces and stop[-1] in tokenizer.decode([i])
                                          for i in range(max(vocab_size, pieces))], device=device)
        self.start()

    def start(self):
        """Before each generate() call."""
        self.columns = None  # the call's tokens on the CPU so far, a list per step, all but the newest
        self.newest = None  # the newest step's tokens and their marks, on their way to the CPU

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(len(input_ids), dtype=torch.bool)
        if self.columns is None:  # the call's first step
            self.columns = input_ids[:, :-1].T.tolist()
        else:
            tokens, marked = self.newest.result().tolist()
            self.columns.append(tokens)
            for row in (row for row, mark in enumerate(marked) if mark):
                done[row] = self.stop in self.tokenizer.decode([column[row] for column in self.columns])
        newest = input_ids[:, -1]
        self.newest = HostCopy(torch.stack([newest, self.may_end_text[newest].long()]))
        return to_device_async(done, input_ids.device)


class RepetitionPenaltyWithBos(LogitsProcessor):
    """The repetition penalty as the original applies it: transformers 4.30 (its pinned version) generates from
    inputs_embeds with a BOS placeholder in input_ids, so the penalty also lowers BOS at every step."""

    def __init__(self, penalty, bos_id):
        self.penalty, self.bos_id = RepetitionPenaltyLogitsProcessor(penalty), bos_id

    def __call__(self, input_ids, scores):
        bos = input_ids.new_full((len(input_ids), 1), self.bos_id)
        return self.penalty(torch.cat([bos, input_ids], dim=1), scores)


class MiniGPT4(nn.Module):
    """The original MiniGPT4 module: visual_encoder, ln_vision, Qformer + query_tokens (Vicuna v0 only),
    llama_proj, llama_model; named as transformers names the BLIP-2 parts."""

    def __init__(self, vision_config, qformer_config, num_query_tokens, language_model):
        super().__init__()
        self.vision_model = Blip2VisionModel(vision_config)
        # MiniGPT-4's ln_vision (eps 1e-5) takes the place of transformers' post_layernorm (eps 1e-6)
        self.vision_model.post_layernorm = nn.Identity()
        self.ln_vision = nn.LayerNorm(vision_config.hidden_size, eps=1e-5)
        if qformer_config is None:
            self.qformer = None
            projection_in = 4 * vision_config.hidden_size
        else:
            self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, qformer_config.hidden_size))
            self.qformer = Blip2QFormerModel(qformer_config)
            projection_in = qformer_config.hidden_size
        self.llama_proj = nn.Linear(projection_in, language_model.config.hidden_size)
        self.language_model = language_model

    def encode_images(self, pixel_values):
        """The original's encode_img: LLM input embeddings for each image."""
        features = self.ln_vision(self.vision_model(pixel_values).last_hidden_state)
        if self.qformer is None:
            patches = features[:, 1:]
            batch, count, width = patches.shape
            return self.llama_proj(patches.reshape(batch, count // 4, 4 * width))
        queries = self.query_tokens.expand(len(features), -1, -1)
        return self.llama_proj(self.qformer(query_embeds=queries, encoder_hidden_states=features).last_hidden_state)


def load_pth(path, what):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"cannot read {what} {path}: {error}")



def read_eval_config(path):
    """The model section of an original eval config merged over its model_type's default model config, as
    the original's Config does, plus the eval image size."""
    if not os.path.isfile(path):
        raise UserError(f"config not found: {path}")
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    model = config.get("model") or {}
    model_type = str(model.get("model_type", "")).removeprefix("pretrain_")
    if model_type not in MODEL_CONFIGS:
        raise UserError(f"{path}: model_type must be pretrain_vicuna0 or pretrain_llama2, "
                        f"not {model.get('model_type')!r}")
    # the original finds the model config inside its package: <repo>/minigpt4/configs/models/
    repo = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    defaults_path = os.path.join(repo, "minigpt4", "configs", "models", MODEL_CONFIGS[model_type])
    defaults = {}
    if os.path.isfile(defaults_path):
        with open(defaults_path) as f:
            defaults = (yaml.safe_load(f) or {}).get("model") or {}
    processor = config.get("datasets", {}).get("cc_sbu_align", {}).get("vis_processor", {}).get("train", {})
    return {**defaults, **model, "model_type": model_type, "image_size": processor.get("image_size", 224)}


def given(value):
    return value if value and PLACEHOLDER not in str(value) else None


def download_url(name):
    return os.environ.get("MINIGPT4_DOWNLOAD_URL", LAVIS_URL).rstrip("/") + "/" + name


def locate_files(model, options):
    """Which files to load: flags first, then the eval config, then the original's defaults in torch hub's cache;
    and {path: URL} of those the original downloads there when they are missing. Reads the eval config only."""
    config = read_eval_config(options["cfg_path"]) if options["cfg_path"] else {"image_size": 224}
    model_type = options["model_type"] or config.get("model_type", "vicuna0")
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    qformer = given(config.get("q_former_model")) or download_url(QFORMER_FILE)
    qformer_url = qformer if qformer.startswith(("http://", "https://")) else None
    files = {
        "model_type": model_type,
        "has_qformer": config.get("has_qformer", model_type == "vicuna0"),
        "image_size": config["image_size"],
        "blip2": options["blip2"],
        "vit": options["vit"] or os.path.join(cache, EVA_FILE),
        "qformer": options["qformer"] or (os.path.join(cache, os.path.basename(qformer_url)) if qformer_url
                                          else qformer),
        "ckpt": model if model != MiniGPT4Captioner.default_model else given(config.get("ckpt")),
        "llm": options["llm"] or given(config.get("llama_model")),
    }
    if not files["ckpt"]:
        raise UserError("no MiniGPT-4 checkpoint: pass --model (pretrained_minigpt4*.pth) or a --cfg-path "
                        "config with its ckpt set")
    if not files["llm"]:
        raise UserError("no LLM folder: pass --llm or set llama_model in the config")
    downloads = {}  # path -> URL of the files the original downloads, where no flag names another file
    if not options["vit"]:
        downloads[files["vit"]] = download_url(EVA_FILE)
    if not options["qformer"] and qformer_url:
        downloads[files["qformer"]] = qformer_url
    return files, downloads


def needed_files(files):
    """(path, what it is) of every file to load, the small ones first."""
    needed = [(files["ckpt"], "MiniGPT-4 checkpoint"), (os.path.join(files["llm"], "config.json"), "LLM config"),
              (os.path.join(files["llm"], "tokenizer.model"), "LLM tokenizer")]
    if files["blip2"]:
        needed.append((os.path.join(files["blip2"], "config.json"), "BLIP-2 folder config"))
    else:
        needed.append((files["vit"], "EVA ViT-g file"))
        if files["has_qformer"]:
            needed.append((files["qformer"], "Q-Former file"))
    return needed


def check_files(files, downloads):
    """Every file is there, or one that the original downloads."""
    for path, what in needed_files(files):
        if not os.path.isfile(path) and path not in downloads:
            raise UserError(f"{what} not found: {path}")


def fetch_missing_files(files, downloads):
    """Every file is checked before the first is loaded, and the small ones before anything is downloaded."""
    for path, what in needed_files(files):
        if not os.path.isfile(path) and path in downloads:
            download_file(downloads[path], path, "--vit" if path == files["vit"] else "--qformer")
        if not os.path.isfile(path):
            raise UserError(f"{what} not found: {path}")


def resolve_files(model, options):
    """The files to load (locate_files), each found on disk or downloaded."""
    files, downloads = locate_files(model, options)
    fetch_missing_files(files, downloads)
    return files


def load_model(files, dtype, device, attn_implementation):
    language_model = LlamaForCausalLM.from_pretrained(
        files["llm"], dtype=dtype, device_map=device, attn_implementation=attn_implementation
    )
    # the original's load order: eva_vit_g.pth, then (with a Q-Former) the Q-Former checkpoint over the whole
    # model, then the MiniGPT-4 checkpoint; later files win, names the model lacks are ignored
    has_qformer = files["has_qformer"]
    if files["blip2"]:
        vision_config, qformer_config, num_query_tokens, state = read_blip2_folder(files["blip2"],
                                                                                   attn_implementation)
        if vision_config.image_size != files["image_size"]:
            raise UserError(f"the BLIP-2 ViT takes {vision_config.image_size} px images, the config asks for "
                            f"{files['image_size']}")
        if not has_qformer:  # its post_layernorm is BLIP-2's ln_vision, from the file the Llama-2 variant never loads
            state = {key: value for key, value in state.items() if not key.startswith("ln_vision.")}
    else:
        eva = load_pth(files["vit"], "EVA ViT-g file")
        vision_config = eva_vision_config(eva, files["image_size"], attn_implementation)
        state = lavis_to_transformers({f"visual_encoder.{key}": value for key, value in eva.items()})
        if has_qformer:
            blip2 = load_pth(files["qformer"], "Q-Former file")
            blip2 = blip2.get("model", {}) if isinstance(blip2, dict) else {}
            qformer_config = lavis_qformer_config(blip2, vision_config.hidden_size, attn_implementation)
            num_query_tokens = blip2["query_tokens"].shape[1]
            state.update(lavis_to_transformers(blip2))
    if not has_qformer:
        qformer_config = num_query_tokens = None
    ckpt = load_pth(files["ckpt"], "MiniGPT-4 checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{files['ckpt']} is not a MiniGPT-4 checkpoint (a dict with 'model')")
    state.update(lavis_to_transformers(ckpt["model"]))
    # where no file holds ln_vision (always so for Llama-2), the original keeps LayerNorm's initial values
    state.setdefault("ln_vision.weight", torch.ones(vision_config.hidden_size))
    state.setdefault("ln_vision.bias", torch.zeros(vision_config.hidden_size))

    with torch.device("meta"):  # the weights come from the files
        model = MiniGPT4(vision_config, qformer_config, num_query_tokens, language_model)
    expected = {key: param.shape for key, param in model.state_dict().items() if not key.startswith("language_model")}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"the files lack {len(missing)} weights, e.g. {missing[:3]}")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise UserError(f"{key} has shape {tuple(state[key].shape)} in the files, the model needs "
                            f"{tuple(shape)} (does model type {files['model_type']} match the checkpoint?)")
    model.load_state_dict({key: state[key] for key in expected}, strict=False, assign=True)
    return model.to(device=device, dtype=dtype).eval()


class MiniGPT4Captioner(Captioner):
    name = "minigpt4"
    default_model = "minigpt4"  # placeholder: the checkpoint comes from --cfg-path unless --model names it
    prompts = presets.MINIGPT4
    default_prompt = "default"
    defaults = {"batch_size": 3}  # the original scripts'; their max_new_tokens 77 is the loop's default
    default_dtype = "float16"  # the original runs the ViT (vit_precision fp16) and the LLM in float16
    caption_flags = ("cfg_path", "model_type", "vit", "qformer", "blip2", "llm")
    model_on_hub = False  # --model is the .pth file (or comes from --cfg-path), checked by resolve_files

    @staticmethod
    def add_arguments(parser):
        group = parser.add_argument_group("MiniGPT-4 files (flags win over --cfg-path)")
        add = group.add_argument
        add("--cfg-path", metavar="FILE", help="the original eval config, e.g. eval_configs/minigpt4_eval.yaml: its "
            "model_type, ckpt and llama_model (merged over <repo>/minigpt4/configs/models/minigpt4_<type>.yaml as "
            "the original does), q_former_model and image size are used")
        add("--model-type", choices=sorted(MODEL_CONFIGS), help="vicuna0 (Q-Former, '###Human:' template) or llama2 "
            "(no Q-Former, '[INST]' template); default: the config's, else vicuna0")
        add("--vit", metavar="FILE", help=f"EVA ViT-g weights ({EVA_FILE}); default: the original's download cache, "
            f"$TORCH_HOME/hub/checkpoints/{EVA_FILE}, downloaded there when missing")
        add("--qformer", metavar="FILE", help=f"BLIP-2 Q-Former checkpoint ({QFORMER_FILE}); default: the config's "
            "q_former_model, else the download cache (downloaded when missing); unused by llama2")
        add("--blip2", metavar="FOLDER", help="a BLIP-2 folder in transformers format (e.g. a download of "
            "Salesforce/blip2-flan-t5-xxl) as the source of ViT and Q-Former, instead of --vit/--qformer")
        add("--minigpt4-ckpt", dest="model", metavar="FILE", default=argparse.SUPPRESS, help="the same as --model: "
            "the MiniGPT-4 checkpoint with llama_proj (pretrained_minigpt4.pth, pretrained_minigpt4_llama2_7b.pth); "
            "its file name (from here or from --cfg-path) names the output folder; default: the --cfg-path "
            "config's ckpt")
        add("--llm", metavar="FOLDER", help="Vicuna v0 or Llama-2-chat folder in HF format with tokenizer.model; "
            "default: the config's llama_model")

    @classmethod
    def name_checkpoint(cls, model, options):
        """Output folder: the MiniGPT-4 checkpoint's file name, also when it comes from --cfg-path, so that two
        variants in one --output-dir never share (and skip) each other's captions. Reads the eval config only:
        the files are checked, and downloaded where missing, when the model loads."""
        files, _ = locate_files(model, options)
        return Path(files["ckpt"]).stem

    @classmethod
    def check_options(cls, model, options):
        check_files(*locate_files(model, options))

    def __init__(self, settings, device):
        files = resolve_files(settings.model, settings.options)
        self.model_type = files["model_type"]
        self.device, self.dtype = device, settings.dtype
        self.model = load_model(files, settings.dtype, device, settings.attn_implementation)
        self.tokenizer = SlowLlamaTokenizer(os.path.join(files["llm"], "tokenizer.model"))
        self.prepare = functools.partial(preprocess, size=files["image_size"])
        self.generation = settings.decoding.generate_kwargs(**CHAT_GENERATION)
        self.segment_ids = functools.lru_cache(maxsize=64)(self.segment_ids)  # the same few prompts in every batch
        self.stop_on_text = StopOnText(self.tokenizer, STOP, self.model.language_model.config.vocab_size, device)

    def segment_ids(self, prompt):
        """The ids of the text before the image (with BOS) and after it (without), each tokenized on its own."""
        segments = TEMPLATES[self.model_type].format(prompt).split("<ImageHere>")
        if len(segments) != 2:
            raise UserError("a prompt must not contain <ImageHere>")
        return tuple(self.tokenizer.encode(text, bos=i == 0) for i, text in enumerate(segments))

    def contexts(self, image_embeds, prompt):
        """The original's get_context_emb for every image with one prompt: the text segments' embeddings around
        each image's, the start cut off where it is too long. The segments are the same for every image, so
        they are embedded once."""
        embed = self.model.language_model.get_input_embeddings()
        before, after = (embed(to_device_async(torch.tensor(ids), image_embeds.device))
                         .expand(len(image_embeds), -1, -1) for ids in self.segment_ids(prompt))
        contexts = torch.cat([before, image_embeds, after], dim=1)
        return contexts[:, -(MAX_LENGTH - self.generation["max_new_tokens"]):]

    @torch.inference_mode()
    def caption(self, images, prompts, inputs=None):
        pixel_values = stack_to_device(images, self.device).to(self.dtype)
        image_embeds = self.model.encode_images(pixel_values)
        by_prompt = [self.contexts(image_embeds, prompt) for prompt in prompts]
        # rows image-major, left padding: zero embeddings, masked out
        length = max(contexts.shape[1] for contexts in by_prompt)
        inputs = image_embeds.new_zeros(len(images), len(prompts), length, image_embeds.shape[-1])
        mask = torch.zeros(len(images), len(prompts), length, dtype=torch.long, device=self.device)
        for j, contexts in enumerate(by_prompt):
            inputs[:, j, length - contexts.shape[1]:] = contexts
            mask[:, j, length - contexts.shape[1]:] = 1
        inputs, mask = inputs.flatten(0, 1), mask.flatten(0, 1)
        eos = self.tokenizer.eos_id
        self.stop_on_text.start()
        outputs = self.model.language_model.generate(
            inputs_embeds=inputs, attention_mask=mask,
            stopping_criteria=StoppingCriteriaList([self.stop_on_text]),
            logits_processor=LogitsProcessorList([RepetitionPenaltyWithBos(REPETITION_PENALTY, self.tokenizer.bos_id)]),
            bos_token_id=self.tokenizer.bos_id, eos_token_id=eos, pad_token_id=eos, **self.generation,
        )
        captions = [self.answer(row) for row in outputs.tolist()]
        return by_image(captions, prompts)

    def answer(self, ids):
        """Chat.answer's cleaning: decode without special tokens, cut at '###', keep what follows the last
        'Assistant:', strip."""
        ended = self.tokenizer.eos_id in ids
        if ended:
            ids = ids[: ids.index(self.tokenizer.eos_id)]
        text = self.tokenizer.decode(ids)
        ended = ended or STOP in text
        return Caption(text.split(STOP)[0].split("Assistant:")[-1].strip(), truncated=not ended)


if __name__ == "__main__":
    run(MiniGPT4Captioner)
