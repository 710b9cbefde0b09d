"""Sends a fixed set of calls to a collector with a published Python SDK, unmodified.

    send.py --sdk segment|rudder --url http://127.0.0.1:8080 --write-key KEY --marker RUN

Every call carries the run marker (in properties or traits, in context for alias). The SDK
makes up each messageId; they are printed to stdout as one JSON list once the client has
flushed. Exits non-zero if the SDK reports any failure: a refused enqueue or an upload error
(retries are off, so a failed upload is never hidden by a later success).
"""

import argparse
import json
import logging
import sys


def client(sdk, url, write_key, on_error):
    # Batching as in production (a background thread posts /v1/batch), but flushed within
    # 100 ms and without retries.
    options = dict(host=url, on_error=on_error, max_retries=0, upload_interval=0.1, upload_size=100)
    if sdk == "segment":
        from segment.analytics import Client

        # A 429 with Retry-After is re-queued uncounted; with no budget it is reported.
        return Client(write_key, max_rate_limit_duration=0, **options)
    if sdk == "rudder":
        from rudderstack.analytics import Client

        return Client(write_key, **options)
    raise SystemExit(f"unknown sdk {sdk!r}")


def calls(c, marker):
    """The calls every SDK makes; each returns what the SDK's method returned."""
    user, anon = f"user-{marker}", f"anon-{marker}"
    return [
        c.track(user_id=user, event="Application Opened", properties={"compat_run": marker, "from_background": False}),
        c.track(anonymous_id=anon, event="Application Opened", properties={"compat_run": marker, "from_background": True}),
        c.identify(user_id=user, traits={"compat_run": marker, "plan": "plus"}),
        c.page(anonymous_id=anon, name="Home", properties={"compat_run": marker, "path": "/"}),
        c.screen(user_id=user, name="Cart", properties={"compat_run": marker}),
        c.group(user_id=user, group_id=f"group-{marker}", traits={"compat_run": marker, "name": "Acme"}),
        c.alias(previous_id=anon, user_id=user, context={"compat_run": marker}),
    ]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sdk", required=True, choices=["segment", "rudder"])
    parser.add_argument("--url", required=True, help="the collector's base URL")
    parser.add_argument("--write-key", required=True)
    parser.add_argument("--marker", required=True, help="put in every call, to find this run's events")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)

    errors = []

    def on_error(error, batch):
        ids = [m.get("messageId") for m in batch]
        errors.append(f"upload of {ids} failed: {error!r}")

    c = client(args.sdk, args.url, args.write_key, on_error)
    ids = []
    for queued, message in calls(c, args.marker):
        if not queued:
            errors.append(f"the SDK did not queue {message.get('type')} {message.get('messageId')}")
        ids.append(message["messageId"])
    c.shutdown()

    for error in errors:
        print(error, file=sys.stderr)
    print(json.dumps(ids))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
