"""The optional extras: which pip extra brings which modules, and the one check that a command's
extra is installed (one line naming the flag and the `pip install` that fixes it)."""

from __future__ import annotations

from .errors import UserError

# extra -> the modules it installs that the code imports
EXTRAS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx", "onnxruntime"),
    "openvino": ("openvino",),
    "coreml": ("coremltools",),
    "prodigy": ("prodigyopt",),
    "app": ("gradio",),
    "lycoris": ("lycoris",),
}


def require_extra(extra: str, flag: str, also: tuple[str, ...] = ()) -> None:
    """Raise a one-line UserError naming `flag` and the extra when one of its modules is missing."""
    for m in (*EXTRAS[extra], *also):
        try:
            __import__(m)  # (the builtin, looked up per call, so a test can hide a package)
        except ImportError:
            raise UserError(f"{flag}: needs the {m} package; install it with pip install 'personalize[{extra}]' "
                            f"(from a checkout: pip install -e \".[{extra}]\" -c requirements/lock.txt)") from None
