"""docs/bring-your-own.md as the tests use it: its files, its demo command, and toy images.

The page marks each code block a test needs with an HTML comment on the line before it
(``<!-- file: PATH -->``, ``<!-- command: NAME -->``), so the tests run the text a new team
reads, not a copy of it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "bring-your-own.md"
CLASSES = ("bacteria", "normal", "virus")

_BLOCK = re.compile(r"<!-- (file|command): (\S+) -->\n```[a-z]*\n(.*?)\n```", re.DOTALL)


def blocks(kind: str) -> dict[str, str]:
    """{name: text} of the page's marked blocks of `kind` ("file" or "command")."""
    return {name: text + "\n" for k, name, text in _BLOCK.findall(DOC.read_text()) if k == kind}


def write_package(root: Path) -> Path:
    """The page's package under `root`; returns the project folder (hospital-ml/)."""
    for name, text in blocks("file").items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "hospital-ml"


def demo_args(name: str = "demo") -> list[str]:
    """The page's `fedbus demo` command as arguments after `fedbus`."""
    text = blocks("command")[name].replace("\\\n", " ")
    args = shlex.split(text)
    assert args[0] == "fedbus", args
    return args[1:]


def set_value(args: list[str], key: str, value: str) -> list[str]:
    """`args` with `--set key=...` replaced by `--set key=value`."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg.startswith(f"{key}=") and i and out[i - 1] == "--set":
            out[i] = f"{key}={value}"
            return out
    raise AssertionError(f"--set {key}=... not in {args}")


def write_images(
    root: Path, *, per_class: dict[str, int], size: int = 40, seed: int = 0, signal: int = 100
) -> Path:
    """RGB PNGs in ImageFolder's layout, root/SPLIT/CLASS/i.png: each class brightens its own
    colour channel by `signal` over noise of 0..120 and a colour cast of sd 20, so a small
    network separates them within a couple of rounds at the default, while a signal of
    about 30 leaves the classes overlapping."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                # Pixel noise, a per-image colour cast (which makes classes overlap when the
                # signal is weak), and the class's own channel brightened.
                pixels = rng.integers(0, 120, (size, size, 3)) + rng.normal(0, 20, 3)
                pixels[..., c] += signal
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root
