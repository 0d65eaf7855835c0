"""The gRPC service containerd.services.snapshots.v1.Snapshots: thin handlers over the store; store
errors become the status codes containerd maps to its own errors (errdefs)."""

import functools
import logging

import grpc
from google.protobuf import empty_pb2, text_format
from google.protobuf.timestamp_pb2 import Timestamp

from . import store as st
from .proto import mount_pb2, snapshots_pb2 as pb, snapshots_pb2_grpc as pb_grpc

LIST_BATCH = 100    # infos per streamed List message

log = logging.getLogger(__name__)


def _grpc_errors(method):
    """Turns the store's refusals into their status, with the message containerd shows."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        log.debug("%s %s", method.__name__, text_format.MessageToString(request, as_one_line=True))
        try:
            return method(self, request, context)
        except st.SnapshotError as e:
            log.debug("%s: %s", e.code, e)
            context.abort(getattr(grpc.StatusCode, e.code), str(e))
    return wrapper


def _mounts(mounts):
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]


def _timestamp(ns):
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def _info(info):
    return pb.Info(name=info.key, parent=info.parent, kind=info.kind,
                   created_at=_timestamp(info.created_ns), updated_at=_timestamp(info.updated_ns),
                   labels=info.labels)


class Snapshots(pb_grpc.SnapshotsServicer):
    def __init__(self, store):
        self.store = store

    @_grpc_errors
    def Prepare(self, request, context):
        mounts = self.store.prepare(request.key, request.parent, dict(request.labels), st.ACTIVE)
        return pb.PrepareSnapshotResponse(mounts=_mounts(mounts))

    @_grpc_errors
    def View(self, request, context):
        mounts = self.store.prepare(request.key, request.parent, dict(request.labels), st.VIEW)
        return pb.ViewSnapshotResponse(mounts=_mounts(mounts))

    @_grpc_errors
    def Mounts(self, request, context):
        return pb.MountsResponse(mounts=_mounts(self.store.mounts(request.key)))

    @_grpc_errors
    def Commit(self, request, context):
        self.store.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_grpc_errors
    def Remove(self, request, context):
        self.store.remove(request.key)
        return empty_pb2.Empty()

    @_grpc_errors
    def Stat(self, request, context):
        return pb.StatSnapshotResponse(info=_info(self.store.stat(request.key)))

    @_grpc_errors
    def Update(self, request, context):
        info = self.store.update(request.info.name, dict(request.info.labels),
                                 list(request.update_mask.paths))
        return pb.UpdateSnapshotResponse(info=_info(info))

    @_grpc_errors
    def List(self, request, context):
        if request.filters:
            # containerd filters in its metadata layer and walks us without any (garbage collection).
            raise st.InvalidArgument("filters are not supported by this snapshotter")
        # Not a generator: the refusal above must happen inside _grpc_errors.
        infos = self.store.list()
        return iter([pb.ListSnapshotsResponse(info=[_info(x) for x in infos[i:i + LIST_BATCH]])
                     for i in range(0, len(infos), LIST_BATCH)])

    @_grpc_errors
    def Usage(self, request, context):
        size, inodes = self.store.usage(request.key)
        return pb.UsageResponse(size=size, inodes=inodes)

    @_grpc_errors
    def Cleanup(self, request, context):
        self.store.cleanup()
        return empty_pb2.Empty()
