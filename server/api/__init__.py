"""The transports: the typed onnxserve.v1 services, KServe v2, and the interceptors around them."""
