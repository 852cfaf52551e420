#!/usr/bin/env python3
"""A Python client of the stylealign gRPC service, through the stylealign_client package.

    pip install ./clients/python
    python3 examples/client.py --server 127.0.0.1:50051 --out out/py

It waits for the server to report SERVING, lists the models, creates a session (PatchModel),
reads it back (GetSession), generates one style-aligned set (events, then images with their
metadata), generates it again and checks the bytes are identical, checks that a bad request is
INVALID_ARGUMENT naming the field, releases the session and checks it is gone (NOT_FOUND). PNGs go
to --out. Any failure: a message on stderr and a non-zero exit status.
"""

import argparse
import os
import sys
import time

try:
    import stylealign_client
except ImportError:  # not installed: the package's source in this checkout
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "clients", "python", "src"))
    import stylealign_client

from stylealign_client import Client, ImageResult, Progress, Queued, Started, StyleAlignError


class Failure(Exception):
    pass


def check(cond, message):
    if not cond:
        raise Failure(message)


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

    with Client(args.server, token=args.token, client_id=args.client_id, generate_timeout=args.timeout) as client:
        client.wait_ready(timeout=args.wait)
        print("health: SERVING (stylealign_client %s)" % stylealign_client.__version__)

        models = client.list_models()
        for m in models:
            print("model %s: %s, native %dx%d, size multiple %d" % (m.name, m.family, m.native_width, m.native_height, m.size_multiple))
        check(args.model in models, "model %r not served (have %s)" % (args.model, models.names))

        session = client.patch_model(args.model)
        check(session.options == {"flavour": "node", "share_norm": "both", "share_attn": "q+k", "scale": 1.0}, "defaults are not the node's: %s" % session.options)
        print("session %s... (expires %s)" % (session.session_id[:24], session.expires_at))
        check(client.get_session(session).session_id == session.session_id, "GetSession returned another session")

        request = dict(seed=args.seed, steps=args.steps, width=args.size, height=args.size, sampler="ddim")
        t = time.time()
        images, steps = [], []
        for event in client.generate(session, prompts, **request):
            if isinstance(event, Queued):
                print("  queued at position %d of %d" % (event.position, event.queue_depth))
            elif isinstance(event, Started):
                print("  started in a batch of %d images (%d requests)" % (event.batch_rows, event.batch_sets))
            elif isinstance(event, Progress):
                steps.append(event.step)
            elif isinstance(event, ImageResult):
                images.append(event)
        print("generated %d images in %.2fs (steps %s)" % (len(images), time.time() - t, steps))
        check(len(images) == len(prompts), "expected %d images, got %d" % (len(prompts), len(images)))
        check(steps == list(range(1, args.steps + 1)), "progress events %s" % steps)

        os.makedirs(args.out, exist_ok=True)
        for img in images:
            check(img.image.size == (img.width, img.height), "PNG is %dx%d, message says %dx%d" % (img.image.size + (img.width, img.height)))
            meta = img.metadata
            check(isinstance(meta, dict), "PNG without JSON parameters (text chunks: %s)" % sorted(img.text))
            for key in ("model", "prompts", "prompt", "seed", "steps", "sampler", "guidance_scale", "width", "height", "options"):
                check(key in meta, "parameters lack %r" % key)
            check(meta["seed"] == args.seed and meta["prompt"] == prompts[img.index], "parameters do not match the request")
            path = os.path.join(args.out, "image_%02d.png" % img.index)
            img.save(path)
            print("  %s: %s%s" % (path, img.prompt, " (style reference)" if img.is_reference else ""))

        repeat = client.generate_images(session, prompts, **request)
        check([i.png for i in repeat] == [i.png for i in images], "the same request and seed gave different bytes")
        print("determinism: same request, same seed -> identical PNG bytes")

        try:
            list(client.generate(session, prompts, width=33, height=32))
            raise Failure("width 33 was accepted")
        except StyleAlignError as e:
            check(e.code.name == "INVALID_ARGUMENT" and e.fields == ["width"], "bad width: %s" % e)
            print("validation: width 33 -> %s" % e)

        client.release_session(session)
        try:
            client.get_session(session)
            raise Failure("released session still found")
        except StyleAlignError as e:
            check(e.code.name == "NOT_FOUND", "GetSession after release: %s" % e)
        print("released; GetSession -> NOT_FOUND")
    print("OK")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failure as e:
        print("FAILED: %s" % e, file=sys.stderr)
        sys.exit(1)
    except StyleAlignError as e:
        print("FAILED: %s" % e, file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # connection problems, timeouts, ...
        print("FAILED: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        sys.exit(2)
