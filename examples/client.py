#!/usr/bin/env python3
"""A Python client of the stylealign gRPC service, through stubs generated with grpcio-tools.

    pip install grpcio-tools
    python3 examples/client.py --server 127.0.0.1:50051 --out out/py

It generates the stubs from proto/ into a temporary folder, then: waits for grpc.health.v1 to
report SERVING, lists the models, creates a session (PatchModel), reads it back (GetSession),
generates one style-aligned set (Generate, streaming progress then PNGs), checks every image
(PNG signature, size, the `stylealign` JSON and `parameters` A1111 text chunks), generates it again and checks the bytes are
identical, checks that a bad request is INVALID_ARGUMENT naming the field, releases the session
and checks it is gone (NOT_FOUND). PNGs go to --out. Any failure: a message on stderr and a
non-zero exit status.
"""

import argparse
import json
import os
import struct
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_DIR = os.path.join(ROOT, "proto")


class Failure(Exception):
    pass


def check(cond, message):
    if not cond:
        raise Failure(message)


def generate_stubs(out_dir):
    """Runs grpc_tools.protoc on proto/ and makes the modules importable."""
    try:
        from grpc_tools import protoc
    except ImportError as e:
        raise Failure("grpcio-tools is not installed (pip install grpcio-tools): %s" % e)
    try:
        from importlib.resources import files

        well_known = str(files("grpc_tools") / "_proto")
    except Exception:  # Python < 3.9
        import pkg_resources

        well_known = pkg_resources.resource_filename("grpc_tools", "_proto")
    out = ["--python_out=" + out_dir, "--grpc_python_out=" + out_dir]
    code = protoc.main(["protoc", "-I" + PROTO_DIR, "-I" + well_known] + out + [os.path.join(PROTO_DIR, "stylealign/v1/stylealign.proto")])
    check(code == 0, "protoc failed on stylealign.proto with status %d" % code)
    # The health proto as a top-level module (health_pb2): a `grpc.health...` module path would
    # collide with the grpc package itself.
    health_dir = os.path.join(PROTO_DIR, "grpc/health/v1")
    code = protoc.main(["protoc", "-I" + health_dir] + out + [os.path.join(health_dir, "health.proto")])
    check(code == 0, "protoc failed on health.proto with status %d" % code)
    sys.path.insert(0, out_dir)


def png_chunks(data):
    """(type, payload) of every chunk; raises on a malformed PNG."""
    check(data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG (bad signature)")
    pos, chunks = 8, []
    while pos < len(data):
        check(pos + 8 <= len(data), "truncated PNG chunk header")
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        payload = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        check(zlib.crc32(kind + payload) & 0xFFFFFFFF == crc, "bad CRC in PNG chunk %r" % kind)
        chunks.append((kind, payload))
        pos += 12 + length
    check(chunks and chunks[-1][0] == b"IEND", "PNG without IEND")
    return chunks


def png_text(data):
    """The tEXt / iTXt chunks of a PNG, as a dict."""
    out = {}
    for kind, payload in png_chunks(data):
        if kind == b"tEXt":
            key, _, text = payload.partition(b"\0")
            out[key.decode("latin-1")] = text.decode("latin-1")
        elif kind == b"iTXt":
            key, _, rest = payload.partition(b"\0")
            compressed, method = rest[0], rest[1]
            _lang, _, rest = rest[2:].partition(b"\0")
            _tkey, _, text = rest.partition(b"\0")
            if compressed:
                check(method == 0, "unknown iTXt compression")
                text = zlib.decompress(text)
            out[key.decode("latin-1")] = text.decode("utf-8")
    return out


def png_size(data):
    kind, ihdr = png_chunks(data)[0]
    check(kind == b"IHDR", "first chunk is not IHDR")
    return struct.unpack(">II", ihdr[:8])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", required=True, help="host:port of the gRPC API")
    ap.add_argument("--out", required=True, help="folder for the PNGs")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prompt", action="append", help="repeat; the first is the style reference")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=0, help="width and height; 0: the model's native size")
    ap.add_argument("--client-id", default="python-client", help="x-client-id (servers without auth)")
    ap.add_argument("--token", default=os.environ.get("STYLEALIGN_TOKEN"), help="bearer token (servers with auth)")
    ap.add_argument("--timeout", type=float, default=300.0, help="deadline of each Generate call, seconds")
    ap.add_argument("--wait", type=float, default=60.0, help="how long to wait for SERVING, seconds")
    args = ap.parse_args()
    prompts = args.prompt or ["a lighthouse, linocut print", "a fox, linocut print", "a teapot, linocut print"]

    with tempfile.TemporaryDirectory(prefix="stylealign-stubs-") as stubs:
        generate_stubs(stubs)
        import grpc
        import health_pb2  # generated
        import health_pb2_grpc  # generated
        from stylealign.v1 import stylealign_pb2 as pb
        from stylealign.v1 import stylealign_pb2_grpc as pb_grpc

        metadata = [("x-client-id", args.client_id)]
        if args.token:
            metadata.append(("authorization", "Bearer " + args.token))
        options = [("grpc.max_receive_message_length", 256 << 20)]
        with grpc.insecure_channel(args.server, options=options) as channel:
            # Health: wait for SERVING (overall and the service).
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.time() + args.wait
            while True:
                try:
                    statuses = [
                        health.Check(health_pb2.HealthCheckRequest(service=s), timeout=5).status
                        for s in ("", "stylealign.v1.StyleAlign")
                    ]
                    if all(s == health_pb2.HealthCheckResponse.SERVING for s in statuses):
                        break
                except grpc.RpcError as e:
                    if time.time() > deadline:
                        raise Failure("health check failed: %s" % e)
                check(time.time() < deadline, "server not SERVING after %.0fs" % args.wait)
                time.sleep(0.2)
            print("health: SERVING")

            stub = pb_grpc.StyleAlignStub(channel)
            models = stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=30)
            names = [m.name for m in models.models]
            for m in models.models:
                print("model %s: %s, native %dx%d, size multiple %d" % (m.name, pb.Family.Name(m.family), m.native_width, m.native_height, m.size_multiple))
            check(args.model in names, "model %r not served (have %s)" % (args.model, names))

            session = stub.PatchModel(pb.PatchModelRequest(model=args.model), metadata=metadata, timeout=30)
            node = session.options.node
            check(node.share_norm == pb.SHARE_NORM_BOTH and node.share_attn == pb.SHARE_ATTN_Q_K and node.scale == 1.0, "defaults are not the node's: %s" % session.options)
            print("session %s (expires %s)" % (session.session_id, session.expires_at.ToJsonString()))
            again = stub.GetSession(pb.GetSessionRequest(session_id=session.session_id), metadata=metadata, timeout=30)
            check(again.session_id == session.session_id, "GetSession returned another session")

            req = pb.GenerateRequest(
                session_id=session.session_id,
                prompts=prompts,
                seed=args.seed,
                steps=args.steps,
                width=args.size,
                height=args.size,
                sampler=pb.SAMPLER_DDIM,
            )

            def run_generate():
                images, steps = [], []
                for msg in stub.Generate(req, metadata=metadata, timeout=args.timeout):
                    kind = msg.WhichOneof("event")
                    if kind == "queued":
                        print("  queued at position %d of %d" % (msg.queued.position, msg.queued.queue_depth))
                    elif kind == "started":
                        print("  started in a batch of %d images (%d requests)" % (msg.started.batch_rows, msg.started.batch_sets))
                    elif kind == "progress":
                        steps.append(msg.progress.step)
                    elif kind == "image":
                        images.append(msg.image)
                return images, steps

            t = time.time()
            images, steps = run_generate()
            print("generated %d images in %.2fs (steps %s)" % (len(images), time.time() - t, steps))
            check(len(images) == len(prompts), "expected %d images, got %d" % (len(prompts), len(images)))
            check(steps == list(range(1, args.steps + 1)), "progress events %s" % steps)
            os.makedirs(args.out, exist_ok=True)
            for img in images:
                w, h = png_size(img.png)
                check((w, h) == (img.width, img.height), "PNG is %dx%d, message says %dx%d" % (w, h, img.width, img.height))
                text = png_text(img.png)
                params = json.loads(text.get("stylealign", "null"))
                check(isinstance(params, dict), "PNG without a `stylealign` text chunk")
                check(params == json.loads(img.parameters), "the `stylealign` chunk differs from the message's parameters")
                check("Seed: %d," % args.seed in text.get("parameters", ""), "PNG without the A1111 `parameters` text")
                for key in ("model", "prompts", "prompt", "seed", "steps", "sampler", "guidance_scale", "width", "height", "options"):
                    check(key in params, "parameters lack %r" % key)
                check(params["seed"] == args.seed and params["prompt"] == prompts[img.index], "parameters do not match the request")
                path = os.path.join(args.out, "image_%02d.png" % img.index)
                with open(path, "wb") as f:
                    f.write(img.png)
                print("  %s: %s" % (path, img.prompt))

            repeat, _ = run_generate()
            check([i.png for i in repeat] == [i.png for i in images], "the same request and seed gave different bytes")
            print("determinism: same request, same seed -> identical PNG bytes")

            try:
                bad = pb.GenerateRequest(session_id=session.session_id, prompts=prompts, width=33, height=32)
                list(stub.Generate(bad, metadata=metadata, timeout=30))
                raise Failure("width 33 was accepted")
            except grpc.RpcError as e:
                check(e.code() == grpc.StatusCode.INVALID_ARGUMENT and "width" in e.details(), "bad width: %s %s" % (e.code(), e.details()))
                print("validation: width 33 -> INVALID_ARGUMENT (%s)" % e.details())

            stub.ReleaseSession(pb.ReleaseSessionRequest(session_id=session.session_id), metadata=metadata, timeout=30)
            try:
                stub.GetSession(pb.GetSessionRequest(session_id=session.session_id), metadata=metadata, timeout=30)
                raise Failure("released session still found")
            except grpc.RpcError as e:
                check(e.code() == grpc.StatusCode.NOT_FOUND, "GetSession after release: %s" % e.code())
            print("released; GetSession -> NOT_FOUND")
    print("OK")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failure as e:
        print("FAILED: %s" % e, file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # grpc errors, connection problems, ...
        print("FAILED: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        sys.exit(2)
