#!/usr/bin/env python3
"""A minimal OTLP/gRPC trace receiver for tests: one JSON line per received span.

usage: otlp-receiver.py HOST:PORT OUT.jsonl

Each line: {"trace_id", "span_id", "parent_span_id" (hex), "name", "service"}. Prints
"listening on PORT" once ready. Runs until killed. Needs grpcio and opentelemetry-proto
(scripts/ci-tools.sh installs both).
"""
import json
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()

    def Export(self, request, context):
        lines = []
        for rs in request.resource_spans:
            service = ""
            for attr in rs.resource.attributes:
                if attr.key == "service.name":
                    service = attr.value.string_value
            for ss in rs.scope_spans:
                for span in ss.spans:
                    lines.append(json.dumps({
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "service": service,
                    }))
        with self.lock, open(self.path, "a") as f:
            for line in lines:
                f.write(line + "\n")
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    addr, out = sys.argv[1], sys.argv[2]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(out), server)
    port = server.add_insecure_port(addr)
    server.start()
    print(f"listening on {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
