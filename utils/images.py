"""Opening images from a crawled dataset, where some files are always broken."""
import io
import warnings

from PIL import Image


class UnreadableImage(Exception):
    """An image that cannot be captioned; the message is the reason recorded in the errors file."""


def read_file(path):
    """The bytes of an image file, or UnreadableImage saying why there are none."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise UnreadableImage("file not found") from None
    except IsADirectoryError:
        raise UnreadableImage("is a directory, not an image file") from None
    except OSError as e:
        raise UnreadableImage(f"cannot read: {e.strerror}") from None


def decode_image(data):
    """Fully decode an image from its bytes, keeping its mode (each model converts it as its reference does).

    Decoding here, not lazily later, makes truncated files fail now, in the worker, with a reason.
    Images above PIL's pixel limit (about 89 megapixels) are refused as decompression bombs.
    """
    if not data:
        raise UnreadableImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UnreadableImage(f"refused as a decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage("not an image file") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UnreadableImage(f"cannot decode: {e}") from None
    if image.width < 1 or image.height < 1:
        raise UnreadableImage(f"image has no pixels ({image.width}x{image.height})")
    return image


def open_image(path):
    """Read and decode an image file (see decode_image)."""
    return decode_image(read_file(path))
