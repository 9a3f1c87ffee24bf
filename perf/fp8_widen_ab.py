"""A/B of the fp8 widening (issue 18): the generated fp8 modules as committed (fp8 -> fp16 by bit moves and one
fp16 multiply) against a copy whose widening is the conversion instruction (``x.to(float16)``: cvt
e4m3x2 -> f16x2), by ``perf/fp8_probe.py --quick`` on the same rows, each in its own process over its own
generated folder (MLA_TUNER_GENERATED_DIR).

    python perf/fp8_widen_ab.py ROW[:PS] ...
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BITS = r"b = x\.to\({0}\.uint8, bitcast=True\)\.to\({0}\.uint16\)\n.*?\.to\({0}\.float16\)\n"
TRITON_BITS = re.compile("    " + BITS.format("tl"), re.S)
GLUON_BITS = re.compile("        " + BITS.format("gl"), re.S)


def converted_copy(dest: Path) -> Path:
    """generated/ copied into ``dest`` with every fp8 module's widening made the conversion instruction."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(ROOT / "generated", dest)
    for path in dest.glob("*_fp8e4m3.py"):
        text = TRITON_BITS.sub("    return x.to(tl.float16)\n", path.read_text(), count=1)
        text = GLUON_BITS.sub("        return x.to(gl.float16)\n", text, count=1)
        assert "bitcast=True" not in text, path
        path.write_text(text)
    return dest


def main(rows: list[str]) -> None:
    out = Path(os.environ.get("OUT", "/tmp/out"))
    variants = {"bits": None, "cvt": converted_copy(ROOT / "build" / "gen_cvt")}
    for name, folder in variants.items():
        env = dict(os.environ, OUT=str(out / name))
        if folder is not None:
            env["MLA_TUNER_GENERATED_DIR"] = str(folder)
        print(f"=== widening: {name}", flush=True)
        subprocess.run([sys.executable, str(ROOT / "perf" / "fp8_probe.py"), "--quick", *rows], env=env, check=False)


if __name__ == "__main__":
    main(sys.argv[1:])
