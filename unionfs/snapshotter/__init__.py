"""A containerd snapshotter (a proxy plugin over gRPC) whose snapshots are unionfs layers."""
