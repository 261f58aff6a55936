"""The prompt presets of the model scripts, as Holistic-CLIP's synthetic_caption scripts wrote them.

Each model script offers its own presets (`--prompt KEY`); utils/caption_qa.py reads them all to find captions
that echo their prompt.
"""

# The seven prompts of InternVL2's multi-perspective recaptioning (keys are ours, texts the original ones).
INTERNVL = {
    "detail": "Describe the image in detail.",
    "short": "Briefly describe the image with just a few words.",
    "sentence": "Briefly describe the image in one sentence.",
    "noun": "Briefly describe the image with few noun words separated by ','.",
    "style": "Describe the style or your feelings about this image, do not say anything about the objects in the image.",
    "background": "Describe only the background of this image, do not say anything about the foreground objects.",
    "main": "Describe only the one main object in the image, do not say anything about the other objects or background.",
}
QWEN = {"default": "Describe the image in detail:"}
LLAVA = {"default": "Describe the <image> in English in detail:"}
MINIGPT4 = {"default": "Describe image content in English in detail:"}

ALL = (*INTERNVL.values(), *QWEN.values(), *LLAVA.values(), *MINIGPT4.values())
