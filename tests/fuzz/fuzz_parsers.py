"""Coverage-guided fuzzing (atheris) of every pure parser wsboard feeds from outside.

    python3 tests/fuzz/fuzz_parsers.py -max_total_time=60 tests/fuzz/corpus   # search
    python3 tests/fuzz/fuzz_parsers.py tests/fuzz/corpus/*                     # replay

The first byte of an input picks the parser, the rest is what a peer would send: a control
line (and, for a JSON line, every JSON op's field checks), an upgrade request's query and
headers (and then the access and token checks), a Pusher socket's frame, a Pusher HTTP API
request, the admin page's query and forms, a resume point. Each parser must answer with a
value or its own refusal (BadRequest, a Refusal, a reason string): any other exception is a
crash, which libFuzzer saves as crash-<hash>. Keep a crash as a file in corpus/ once it is
fixed: tests/test_fuzz.py replays every file there.
"""

import os
import sys
import time
from urllib.parse import parse_qsl

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
with atheris.instrument_imports(include=["wsboard", "wsboard_client"]):
    import wsboard

KEY, SECRET = "fuzz-key", "fuzz-secret-123"
CONFIG = wsboard.load_config(["--secret", "s" * 32, "--allowed-origins", "https://app.example"])
TRUSTED = wsboard._networks("127.0.0.0/8")
NOW = 1_900_000_000.0


def fields(data: bytes, count: int) -> list:
    """data as count latin-1 strings (as WSGI gives header values), split at newlines."""
    parts = data.decode("latin-1").split("\n", count - 1)
    return parts + [""] * (count - len(parts))


def control_line(data: bytes) -> None:
    command = wsboard.parse_control_line(data)
    assert isinstance(command, wsboard.Command)
    if command.verb == "json":
        json_op(data)
    answer = wsboard.shutting_down_answer(data)
    assert answer.startswith(("ERROR ", "{"))


def json_op(data: bytes) -> None:
    try:
        request = wsboard.strict_json(data)
    except wsboard.BadRequest:
        return
    if not isinstance(request, dict):
        return
    checks = (
        wsboard.json_ids,
        wsboard.json_text,
        wsboard.json_conn,
        wsboard.json_channel,
        wsboard.json_channels,
        wsboard.json_target,
    )
    for check in checks:
        try:
            check(request)
        except wsboard.BadRequest:
            pass
    try:
        epoch, offset = wsboard.history_since(request.get("since"))
        assert 0 <= offset < 10**16 and 1 <= len(epoch) <= 16
    except wsboard.BadRequest:
        pass


def handshake(data: bytes) -> None:
    query, connection, version, key, offered, origin, host, forwarded = fields(data, 8)
    environ = {
        "REQUEST_METHOD": "GET",
        "QUERY_STRING": query,
        "HTTP_CONNECTION": connection,
        "HTTP_SEC_WEBSOCKET_VERSION": version,
        "HTTP_SEC_WEBSOCKET_KEY": key,
        "HTTP_SEC_WEBSOCKET_PROTOCOL": offered,
        "HTTP_ORIGIN": origin,
        "HTTP_HOST": host,
        "HTTP_X_FORWARDED_FOR": forwarded,
        "REMOTE_ADDR": "127.0.0.1",
    }
    hs = wsboard.parse_handshake(environ, "HTTP/1.1", ("127.0.0.1", 4242), TRUSTED)
    if isinstance(hs, wsboard.Refusal):
        assert 400 <= hs.status < 500 and hs.reason
        return
    refusal = wsboard.access_refusal(hs, CONFIG, NOW)
    assert refusal is None or refusal.status == 403


def pusher_frame(data: bytes) -> None:
    try:
        frame = wsboard.strict_json(data)
    except wsboard.BadRequest:
        return
    if not isinstance(frame, dict) or not isinstance(frame.get("data"), dict):
        return
    body = frame["data"]
    channel = body.get("channel")
    if not wsboard.is_valid_channel(channel):
        return
    reason = wsboard.pusher_auth_refusal(
        KEY, SECRET, "1.2", channel, body.get("auth"), body.get("channel_data")
    )
    assert reason is None or isinstance(reason, str)
    if isinstance(body.get("channel_data"), str):
        user = wsboard.pusher_user(body["channel_data"])
        assert isinstance(user, (str, tuple))


def pusher_api(data: bytes) -> None:
    method, path, query, body = fields(data, 4)
    raw = body.encode("latin-1")
    refusal = wsboard.pusher_api_refusal(KEY, SECRET, method, path, query, raw, NOW)
    assert refusal is None or 400 <= refusal.status < 500
    try:
        request = wsboard.strict_json(raw)
    except wsboard.BadRequest:
        request = None
    for item in request.get("batch", [request]) if isinstance(request, dict) else []:
        if isinstance(item, dict):
            try:
                wsboard.pusher_trigger_request(item, 10_000)
            except wsboard.BadRequest:
                pass
    info = dict(parse_qsl(query, keep_blank_values=True)).get("info", "")
    try:
        wsboard.channel_info_wanted(info, ["presence-a", "b"])
    except wsboard.BadRequest:
        pass


def admin(data: bytes) -> None:
    query, body = fields(data, 2)
    parsed = wsboard.parse_admin_query(dict(parse_qsl(query, keep_blank_values=True)))
    assert isinstance(parsed, (tuple, wsboard.Refusal))
    for parse in (wsboard.parse_send_request, wsboard.parse_publish_request):
        try:
            parse(body.encode("latin-1"))
        except wsboard.BadRequest:
            pass


def resume(data: bytes) -> None:
    epoch, last = fields(data, 2)
    point = wsboard.resume_point(epoch, last)
    assert isinstance(point, (tuple, wsboard.Refusal))
    number = wsboard.bounded_int(last, 16)
    assert number is None or 0 <= number < 10**16
    since = wsboard.parse_since([epoch, last], 100)  # <channel>:<epoch>:<offset> each
    if not isinstance(since, wsboard.Refusal):
        for channel, since_epoch, offset in since:
            assert wsboard.is_valid_channel(channel) and since_epoch and 0 <= offset < 10**16


def tokens(data: bytes) -> None:
    client_id, exp, token = fields(data, 3)
    reason = wsboard.token_refusal(CONFIG.secret_key, client_id, exp, token, NOW, ["private-a"])
    assert reason is None or isinstance(reason, str)


TARGETS = (control_line, handshake, pusher_frame, pusher_api, admin, resume, tokens)


def one_input(data: bytes) -> None:
    if data:
        TARGETS[data[0] % len(TARGETS)](data[1:])


def main() -> None:
    started = time.monotonic()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
    sys.stderr.write(f"fuzzing ended after {time.monotonic() - started:.0f} s\n")


if __name__ == "__main__":
    main()
