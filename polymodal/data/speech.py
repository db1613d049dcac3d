"""Speech made on this machine with espeak-ng, for spoken datasets (e.g. audio-text pairs
for binding an audio tower to a text space: ImageBind's recipe, with text as the anchor;
data/easy_vqa.py's `easy-vqa-speech` speaks its captions).

A spoken dataset says each text in several voices and speeds; the voices of `train` and
`test` differ, so a test clip is a voice the model never heard. Clips are cached under
`~/.cache/polymodal/speech/` (`POLYMODAL_CACHE` moves it), each written atomically.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from polymodal.errors import UserError

VOICES = {"train": [("en-us", 140), ("en-us", 180), ("en-gb", 150), ("en-gb-scotland", 170),
                    ("en-029", 160), ("en-us+f2", 155), ("en-gb+f4", 175), ("en-gb-x-gbclan", 145)],
          "test": [("en-gb-x-rp", 160), ("en-us+m3", 165)]}


def speech_cache() -> Path:
    root = os.environ.get("POLYMODAL_CACHE")
    base = Path(root) if root and root != "off" else Path.home() / ".cache" / "polymodal"
    return base / "speech"


def speak(text: str, voice: str, speed: int, out: Path) -> Path:
    """`text` spoken into the WAV file `out` (made once; atomic)."""
    if out.is_file():
        return out
    if shutil.which("espeak-ng") is None:
        raise UserError("espeak-ng is not installed (apt-get install espeak-ng; `make install` does it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(temp), text],
                       check=True, capture_output=True, timeout=60)
        os.replace(temp, out)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        raise UserError(f"espeak-ng could not speak {text!r} with voice {voice}: {error}") from None
    finally:
        temp.unlink(missing_ok=True)
    return out
