"""yolo-tokens serving: the Ray Serve graph, the pure inference engine and image decoding."""
