"""Caption images with Qwen2-VL, exactly as its model card runs it, batched.

    bash generate.sh input.json qwen [--model Qwen/Qwen2-VL-7B-Instruct] [flags]

The model card: the chat template with the image before the text, `qwen_vl_utils.process_vision_info`
to resize, the native processor and `Qwen2VLForConditionalGeneration.generate` with the checkpoint's
generation config. The only differences: many images go through one `generate` call, left-padded, and
the images are decoded and resized in the loop's worker processes.
"""
import functools

from qwen_vl_utils import fetch_image
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from utils.captioning import Caption, generation_kwargs, run, stopped_at_limit


def resize_image(image, min_pixels, max_pixels, patch_size):
    """qwen_vl_utils' resize: RGBA onto white, then to a multiple of 2 patches within the pixel budget."""
    return fetch_image({"image": image, "min_pixels": min_pixels, "max_pixels": max_pixels},
                       image_patch_size=patch_size)


class QwenCaptioner:
    name = "qwen"
    default_model = "Qwen/Qwen2-VL-7B-Instruct"
    prompts = {"default": "Describe the image in detail:"}
    default_prompt = "default"
    defaults = {"batch_size": 16}
    default_dtype = "bfloat16"

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--min-pixels", type=int, default=None,
                            help="smallest image area after resizing (default: the checkpoint's processor setting)")
        parser.add_argument("--max-pixels", type=int, default=None,
                            help="largest image area after resizing; lower it to save memory and time "
                            "(default: the checkpoint's processor setting)")

    def __init__(self, args, device):
        self.processor = AutoProcessor.from_pretrained(args.model)
        image_processor = self.processor.image_processor
        # qwen_vl_utils and the processor must use the same limits, or images are resized twice.
        min_pixels = args.min_pixels or image_processor.size["shortest_edge"]
        max_pixels = args.max_pixels or image_processor.size["longest_edge"]
        image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        self.prepare = functools.partial(resize_image, min_pixels=min_pixels, max_pixels=max_pixels,
                                         patch_size=image_processor.patch_size)
        self.pixels_per_token = (image_processor.patch_size * image_processor.merge_size) ** 2
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(
            args.model, dtype=args.dtype, attn_implementation=args.attn_implementation).to(device).eval()
        self.generation = generation_kwargs(args)
        end = self.model.generation_config.eos_token_id
        self.end_token_ids = set(end if isinstance(end, list) else [end])

    def chat_text(self, prompt):
        message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(message, tokenize=False, add_generation_prompt=True)

    def cost(self, image):
        return image.width * image.height // self.pixels_per_token

    def caption(self, images, prompts):
        texts = [self.chat_text(prompt) for prompt in prompts]
        inputs = self.processor(text=[text for _ in images for text in texts],
                                images=[image for image in images for _ in texts],
                                padding=True, padding_side="left", return_tensors="pt").to(self.model.device)
        output = self.model.generate(**inputs, **self.generation)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        answers = self.processor.batch_decode(new_tokens, skip_special_tokens=True,
                                              clean_up_tokenization_spaces=False)
        captions = [Caption(text, stopped_at_limit(row, self.end_token_ids))
                    for text, row in zip(answers, new_tokens)]
        return [captions[i * len(prompts):(i + 1) * len(prompts)] for i in range(len(images))]


if __name__ == "__main__":
    run(QwenCaptioner)
