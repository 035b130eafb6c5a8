"""apo-train: the APO round runner (sample, judge, train with DPO or SPPO, extrapolate)."""
