"""Trace collection and tail-latency analysis: ``constellation traces collect|analyze``."""
