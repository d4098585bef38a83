"""A stand-in for a VOS3000 IVR: benign traffic, labelled fraud incidents, scenario files."""
