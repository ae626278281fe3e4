"""KEDA's external scaler contract: generated stubs (built by ``make``, never committed)."""
