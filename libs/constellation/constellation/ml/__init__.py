"""Machine learning shared by services and their trainers: the sentence encoder and its caches, answer
extraction and normalisation, reliability-weighted voting, and calibration (one isotonic fit, ECE).

Plain numpy (and the encoder's torch), no gRPC, no I/O beyond the encoder's weights and cache files.
"""
