"""The image store: layers unpacked once and shared, images as ordered layer lists with their config."""
