"""Classify image files (PNG, JPEG...) or NumPy arrays with a saved model: `kbench predict`.

Images are read with Keras' `load_img` (PIL), resized to the model's input height and width
(bilinear, aspect ratio not kept) and converted to grey when the model takes one channel.
Pixels stay raw 0..255: kbench models normalize inside. A .npy file holds one input or a batch
of them (token ids for text models). Class names come from the dataset named in the
metrics.json (or config.json) a recipe wrote next to model.keras, when there is one.
"""

import os
import sys

import numpy as np

from kbench.errors import KbenchError
from kbench.evaluation import probabilities

NPY = ".npy"


def predict_files(model_path, paths, top=5):
    """Top-`top` classes of every input in `paths` (image files and/or .npy arrays).

    Returns one dict per input: `input` (file name, `file.npy[i]` for a row of a batch) and
    `top`, a list of {class, name, probability} from the most likely class down.
    """
    from kbench.models.saving import load_model, run_info

    if top < 1:
        raise KbenchError(f"--top must be at least 1, not {top}")
    if not paths:
        raise KbenchError("pass at least one image file or .npy array to classify")
    model = load_model(model_path)
    names, inputs = read_inputs(paths, model)
    outputs = np.asarray(model.predict(inputs, verbose=0, batch_size=64))
    probs = probabilities(outputs)
    class_names = _class_names(run_info(model_path), probs.shape[1])
    rows = []
    for name, p in zip(names, probs):
        best = np.argsort(-p, kind="stable")[:top]
        rows.append({"input": name, "top": [
            {"class": int(c), "name": class_names[c] if class_names else None,
             "probability": float(p[c])} for c in best]})
    return rows


def format_predictions(rows):
    """One line per input: `cat.png: cat 0.812, dog 0.103, deer 0.041`."""
    def label(pick):
        return pick["name"] if pick["name"] is not None else f"class {pick['class']}"

    return "\n".join(f"{row['input']}: " + ", ".join(
        f"{label(pick)} {pick['probability']:.3f}" for pick in row["top"]) for row in rows)


def read_inputs(paths, model):
    """(names, batch) for the model's input: images resized to its H, W, C; .npy as given."""
    spec = model.inputs[0]
    shape = tuple(spec.shape[1:])
    takes_ids = "int" in str(spec.dtype)
    names, arrays, from_npy = [], [], []
    for path in map(os.fspath, paths):
        if path.lower().endswith(NPY):
            batch, single = _read_npy(path, shape)
            arrays.extend(batch)
            from_npy.extend([True] * len(batch))
            names.extend([path] if single else [f"{path}[{i}]" for i in range(len(batch))])
        elif takes_ids:
            raise KbenchError(f"{path}: this model takes token ids, not images; pass them as a "
                              f".npy array of shape (N, {shape[0]}) or ({shape[0]},)")
        else:
            arrays.append(_read_image(path, shape))
            from_npy.append(False)
            names.append(path)
    dtype = "int32" if takes_ids else "float32"
    stacked = np.stack(arrays)
    if takes_ids and stacked.size and not np.array_equal(stacked, np.round(stacked)):
        # int32 would truncate 3.7 to token 3 without a word
        raise KbenchError("token ids are whole numbers; the inputs hold fractions (e.g. "
                          f"{stacked[stacked != np.round(stacked)].flat[0]:g}): pass the ids "
                          "the model's tokenizer gave")
    if takes_ids:
        _check_ids(stacked, model)  # before the cast: an id past 2**31 would wrap into range
    batch = stacked.astype(dtype)
    # Only arrays can come scaled (image files are read as 0..255 here), and an all-black one
    # says nothing either way.
    given = batch[np.asarray(from_npy, bool)]
    if not takes_ids and given.size and 0 < given.max() <= 1.0:
        print("note: the .npy inputs look scaled to 0..1; kbench models take raw 0..255 pixels",
              file=sys.stderr)
    return names, batch


def _check_ids(ids, model):
    """Token ids outside the embedding table: one line here, not an index error (or, under
    JAX, a silently clamped lookup) inside the model."""
    from kbench.models.saving import vocab_size

    vocab = vocab_size(model)
    if ids.size and (ids.min() < 0 or (vocab and ids.max() >= vocab)):
        raise KbenchError(f"token ids must lie in [0, {vocab or '...'}) for this model; the "
                          f"inputs hold {int(ids.min())}..{int(ids.max())}")


def _read_image(path, shape):
    import keras
    from PIL import Image, UnidentifiedImageError
    from PIL.Image import DecompressionBombError

    if len(shape) != 3:
        raise KbenchError(f"this model takes inputs of shape {shape}, not images")
    height, width, channels = shape
    if channels not in (1, 3):
        raise KbenchError(f"this model takes {channels}-channel inputs; images have 1 or 3: "
                          "pass a .npy array instead")
    if not os.path.isfile(path):
        raise KbenchError(f"{path}: no such file")
    try:
        with Image.open(path) as source:  # its header: the mode before any conversion
            eight_bit = _as_8_bit(source, path)
        image = keras.utils.load_img(
            eight_bit or path, color_mode="grayscale" if channels == 1 else "rgb",
            target_size=(height, width) if height and width else None, interpolation="bilinear")
    except KbenchError:  # _as_8_bit's own line (a KbenchError is a ValueError)
        raise
    except DecompressionBombError as exc:  # PIL refuses to decode it: not an OSError
        size = f" to {height}x{width}" if height and width else ""
        raise KbenchError(f"{path} is too large to read safely ({exc.args[0].split(',')[0]}): "
                          f"shrink it{size} first") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise KbenchError(f"{path} is not a readable image ({type(exc).__name__}): pass PNG or "
                          "JPEG files, or a .npy array") from None
    return np.asarray(image, dtype=np.float32).reshape(height, width, channels)


def _as_8_bit(source, path):
    """None for an image of 8 bits a channel, which Keras' load_img reads as it is; else the
    image as an 8-bit grey PNG in memory. kbench models take 0..255 pixels, and load_img
    passes a 16-bit grey image to a grey model as 0..65535 (confident, silent nonsense) and
    clips any wider image to 255 on its way to L or RGB. 16-bit grey is scaled by its bit
    depth; a 32-bit integer or float image has no known range, and one holding values outside
    0..255 is refused."""
    import io

    from PIL import Image

    mode = source.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return None
    pixels = np.asarray(source, dtype=np.float64)
    if mode.startswith("I;16"):
        pixels = pixels * (255.0 / 65535.0)
    elif pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise KbenchError(f"{path} is a {'32-bit integer' if mode == 'I' else 'float'} image "
                          f"holding {pixels.min():g}..{pixels.max():g}; kbench models take "
                          "0..255 pixels: save it as an 8-bit image, or pass a .npy array "
                          "scaled to 0..255")
    buffer = io.BytesIO()
    Image.fromarray(np.round(pixels).astype(np.uint8), mode="L").save(buffer, format="PNG")
    buffer.seek(0)
    return buffer


def _read_npy(path, shape):
    """(batch, single) from a .npy holding one input (shape == model input; single is True) or
    a batch of them; (N, H, W) and (H, W) are accepted for one-channel models."""
    if not os.path.isfile(path):
        raise KbenchError(f"{path}: no such file")
    try:
        array = np.load(path, allow_pickle=False)  # never unpickle: a .npy may come from anywhere
    except (OSError, ValueError, EOFError) as exc:
        raise KbenchError(f"{path} is not a readable .npy array ({type(exc).__name__}): "
                          "save one with numpy.save") from None
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise KbenchError(f"{path} holds {array.dtype} values, not real numbers")
    if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
        raise KbenchError(f"{path} holds NaN or infinite values: its predictions would be "
                          "NaN; pass finite pixel values")
    readings = [array]
    if len(shape) == 3 and shape[-1] == 1:
        readings.append(array[..., None])  # grey images given without their channel axis
    for candidate in readings:
        if _fits(candidate.shape, shape):
            return candidate[None], True
        if candidate.ndim == len(shape) + 1 and _fits(candidate.shape[1:], shape):
            if not len(candidate):
                raise KbenchError(f"{path} holds an empty batch")
            return candidate, False
    raise KbenchError(f"{path} has shape {array.shape}; this model takes {tuple(shape)} "
                      f"inputs: pass one of shape {tuple(shape)} or a batch (N, "
                      f"{', '.join(str(d) for d in shape)})")


def _fits(array_shape, shape):
    return len(array_shape) == len(shape) and all(
        want is None or want == got for got, want in zip(array_shape, shape))


def _class_names(run, num_classes):
    """Class names of the dataset the model was trained on, if its run says which and that
    dataset names exactly `num_classes` classes."""
    from kbench.data.registry import class_names

    dataset = run["config"].get("dataset") if run else None
    try:
        names = class_names(dataset) if dataset else None
    except KbenchError:  # a dataset this kbench does not know: numbered classes
        return None
    return names if names is not None and len(names) == num_classes else None
