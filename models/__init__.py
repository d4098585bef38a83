"""Online River models per caller and per IVR menu (see issue: models)."""
