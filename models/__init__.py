"""Online River models per caller and per IVR menu, behind the interface engine.detect
defines (engine/detect/detectors.py)."""

# First: its finder decides whether the compiled modules, this package's among them
# (engine.detect.COMPILED), are used or their sources, before any is looked for.
import engine.detect  # noqa: F401
