#!/usr/bin/env python3
"""Holds S idle subscriptions on S distinct channels of a Bayeux server, for the channel sweep of
bench/compare.sh: `hold-subscriptions.py URL S` opens ceil(S/1000) long-polling sessions, each
subscribing to up to 1000 channels /idle/<n> in one message, prints READY, then keeps every
session alive with held /meta/connect requests until it gets SIGTERM. Nothing is ever published
to these channels: they only make the server's subscription index bigger. Loopback only; every
request is bounded by a timeout."""

import http.client
import json
import signal
import sys
import threading
import urllib.parse

PER_SESSION = 1000  # bayeux's default max_subscriptions_per_session


def main():
    url = urllib.parse.urlparse(sys.argv[1])
    total = int(sys.argv[2])
    assert url.hostname in ("127.0.0.1", "localhost"), "loopback only"
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def post(conn, messages, timeout):
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        conn.request("POST", url.path, body=json.dumps(messages),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"[]")

    sessions = []
    for start in range(0, total, PER_SESSION):
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        _, reply = post(conn, [{"channel": "/meta/handshake", "version": "1.0",
                                "supportedConnectionTypes": ["long-polling"]}], 30)
        client_id = reply[0]["clientId"]
        channels = [f"/idle/{n}" for n in range(start, min(total, start + PER_SESSION))]
        _, reply = post(conn, [{"channel": "/meta/subscribe", "clientId": client_id,
                                "subscription": channels}], 30)
        if not reply[0].get("successful"):
            sys.exit(f"subscribe failed: {reply}")
        post(conn, [{"channel": "/meta/connect", "clientId": client_id,
                     "connectionType": "long-polling", "advice": {"timeout": 0}}], 30)
        sessions.append((conn, client_id))
    print(f"READY {total} subscriptions in {len(sessions)} sessions", flush=True)

    def keep_alive(conn, client_id):
        while not stop.is_set():
            try:
                post(conn, [{"channel": "/meta/connect", "clientId": client_id,
                             "connectionType": "long-polling"}], 60)
            except (OSError, http.client.HTTPException, ValueError):
                if stop.wait(1):
                    return

    threads = [threading.Thread(target=keep_alive, args=s, daemon=True) for s in sessions]
    for t in threads:
        t.start()
    stop.wait()


if __name__ == "__main__":
    main()
