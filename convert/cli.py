"""``edgezo convert SRC DST [--type T] [--base B]``: the direction is read from SRC.

HF folder -> GGUF; GGUF model -> HF folder (or, when DST ends in .gguf, a re-quantized GGUF);
PEFT folder -> GGUF LoRA (``--base``: the base HF folder or GGUF); GGUF LoRA -> PEFT folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k", "iq4_nl")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``convert`` subcommand to the edgezo CLI."""
    p = subparsers.add_parser(
        "convert",
        help="convert models and LoRA adapters between HF/PEFT and GGUF, and quantize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", type=Path, help="HF folder, PEFT folder, GGUF model or GGUF LoRA")
    p.add_argument("dst", type=Path, help="output file (GGUF) or folder (HF / PEFT)")
    p.add_argument("--type", choices=TYPES, default=None, help="GGUF tensor type (default f32)")
    p.add_argument("--base", type=Path, default=None, help="base model (HF folder or GGUF) for LoRA conversion")
    p.set_defaults(handler=run)


def convert(src: Path, dst: Path, out_type: str | None = None, base: Path | None = None) -> Path:
    """Convert ``src`` to ``dst``, choosing the direction from what ``src`` is. Raises ConvertError."""
    from convert.errors import ConvertError

    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise ConvertError(f"{src} not found")
    if src.is_dir():
        if (src / "adapter_config.json").is_file():
            if base is None:
                raise ConvertError("converting a PEFT adapter needs --base (the base HF folder or GGUF)")
            _only_f32(out_type, "a LoRA adapter")
            from convert.lora import peft_to_gguf

            return peft_to_gguf(src, dst, base)
        from convert.hf_to_gguf import hf_to_gguf

        if not (src / "config.json").is_file():
            raise ConvertError(f"{src} has neither config.json (HF model) nor adapter_config.json (PEFT adapter)")
        return hf_to_gguf(src, dst, out_type or "f32")
    from convert.lora_gguf import open_gguf

    reader = open_gguf(src)
    kind = reader.fields.get("general.type")
    if kind is not None and kind.contents() == "adapter":
        _only_f32(out_type, "a PEFT adapter")
        from convert.lora import gguf_to_peft

        return gguf_to_peft(src, dst, base)
    if dst.suffix == ".gguf":
        if out_type is None:
            raise ConvertError("GGUF -> GGUF needs --type (the quantization to apply)")
        from convert.quantize import quantize_gguf

        return quantize_gguf(src, dst, out_type)
    _only_f32(out_type, "an HF folder (always fp32)")
    from convert.gguf_to_hf import gguf_to_hf

    return gguf_to_hf(src, dst, reader=reader)


def _only_f32(out_type: str | None, what: str) -> None:
    from convert.errors import ConvertError

    if out_type not in (None, "f32"):
        raise ConvertError(f"--type {out_type} does not apply when writing {what}")


def run(args: argparse.Namespace) -> int:
    """CLI handler: 0 on success, 2 with one line on a ConvertError or an OS error (permissions, a full disk, a
    file where a folder should be). Outputs are written to a temporary name and renamed (convert.atomic), so a
    failed conversion leaves no partial file and an existing output untouched."""
    from convert.errors import ConvertError

    try:
        out = convert(args.src, args.dst, args.type, args.base)
    except ConvertError as e:
        print(f"edgezo convert: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # strerror + the path it concerns, never a traceback
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"edgezo convert: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
