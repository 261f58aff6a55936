"""Original-format checkpoints -> transformers' native classes, as transformers keeps its convert_* scripts beside
its model files. The model scripts call these while loading an original checkpoint; nothing here captions.

    convert/internvl.py   InternVL2 (model_type "internvl_chat") -> InternVLForConditionalGeneration; also writes
                          a native folder (python internvl.py --convert-to DIR --model CKPT)
    convert/llava.py      LLaVA-1.5 (LlavaLlamaForCausalLM with mm_* keys) and its CLIP tower
                          -> LlavaForConditionalGeneration
    convert/minigpt4.py   MiniGPT-4's LAVIS files (EVA ViT-g, Q-Former) -> transformers' BLIP-2 parts
"""
from utils.errors import UserError


def load_converted(model_class, config, state_dict, folder, what, **from_pretrained):
    """model_class with a converted config and state dict; every weight must match the config (else UserError,
    naming `folder` and what the weights should have been)."""
    model, info = model_class.from_pretrained(None, config=config, state_dict=state_dict, output_loading_info=True,
                                              **from_pretrained)
    problems = [*sorted(info["missing_keys"]), *sorted(info["unexpected_keys"]), *info["mismatched_keys"]]
    if problems:
        raise UserError(f"{folder}: weights do not match {what} (missing, unexpected or mismatched: "
                        f"{', '.join(map(str, problems[:5]))})")
    return model
