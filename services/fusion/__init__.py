"""The fusion service: turns ranked candidates into one answer (FusionService/Fuse).

Closed answers (numbers, choices) are decided by a reliability-weighted vote with a calibrated
confidence (:mod:`constellation.ml.vote`, :mod:`services.fusion.calibration`); open answers are written
by a fuser LLM on Triton that reads the top candidates (:mod:`services.fusion.fuse`).
"""
