"""Opening images from a crawled dataset, where some files are always broken."""
import os
import warnings

from PIL import Image


class UnreadableImage(Exception):
    """An image that cannot be captioned; the message is the reason recorded in the errors file."""


def open_image(path):
    """Open and fully decode an image, keeping its mode (each model converts it as its reference does).

    Decoding here, not lazily later, makes truncated files fail now, in the worker, with a reason.
    Images above PIL's pixel limit (about 89 megapixels) are refused as decompression bombs.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
    except FileNotFoundError:
        raise UnreadableImage("file not found") from None
    except IsADirectoryError:
        raise UnreadableImage("is a directory, not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UnreadableImage(f"refused as a decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        reason = "empty file" if os.path.getsize(path) == 0 else "not an image file"
        raise UnreadableImage(reason) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UnreadableImage(f"cannot decode: {e}") from None
    if image.width < 1 or image.height < 1:
        raise UnreadableImage(f"image has no pixels ({image.width}x{image.height})")
    return image
