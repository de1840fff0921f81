"""The LAMP path for real: Debian's Apache with mod_php runs deploy/apache/wsboard.conf, a PHP
page served by it (as www-data) pushes through the control socket, and Chromium connects
through Apache's proxy. nginx runs deploy/nginx/wsboard.conf the same way, and
deploy/systemd/wsboard.service passes systemd-analyze verify."""

import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import pytest
import websocket
from conftest import ROOT, ask_json, free_port, wait_until
from selenium.webdriver.common.by import By
from test_browser import browser, messages, wait  # noqa: F401 - the Chromium fixture
from test_events import Stream

import wsboard

DEPLOY = os.path.join(ROOT, "deploy")
APACHE = shutil.which("apache2") or "/usr/sbin/apache2"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
MODULES = "/usr/lib/apache2/modules"
SECRET = "lamp-secret-of-at-least-16"
AS_ROOT = os.geteuid() == 0  # CI: Apache's children and PHP run as www-data, as in production


@pytest.fixture
def site():
    """A directory Apache's www-data can read, with a run/ only root and www-data enter."""
    base = tempfile.mkdtemp(prefix="wsboard-lamp-")
    os.chmod(base, 0o755)
    docroot = os.path.join(base, "www")
    shutil.copytree(os.path.join(DEPLOY, "apache", "www"), docroot)
    shutil.copytree(
        os.path.join(ROOT, "clients", "php"),
        os.path.join(docroot, "wsboard-client"),
        ignore=shutil.ignore_patterns("tests", "*.xml.dist"),
    )
    for directory, _, files in os.walk(docroot):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
    run = os.path.join(base, "run")
    os.mkdir(run, 0o750)
    if AS_ROOT:
        os.chown(run, 0, wsboard._group("www-data"))
    secret = os.path.join(run, "secret")
    with open(secret, "w") as f:
        f.write(SECRET + "\n")
    os.chmod(secret, 0o640)
    if AS_ROOT:
        os.chown(secret, 0, wsboard._group("www-data"))
    yield {
        "base": base,
        "docroot": docroot,
        "control": os.path.join(run, "wsboard.sock"),
        "secret": secret,
    }
    shutil.rmtree(base, ignore_errors=True)


def lamp_server(server_factory, site):
    group = ("--control-group", "www-data") if AS_ROOT else ()
    return server_factory(
        "--control",
        site["control"],
        *group,
        "--trusted-proxies",
        "127.0.0.1",
        "--secret-file",
        site["secret"],
    )


@pytest.fixture
def apache(site):
    started = []

    def start(upstream_port: int, port: int = 0, timeout: int = 0) -> str:
        """Apache on port, proxying to upstream_port; timeout: its Timeout (the proxy's idle
        limit) when not the default 60 s."""
        port = port or free_port()
        base = site["base"]
        php = glob.glob(os.path.join(MODULES, "libphp*.so"))[0]
        modules = {
            "mpm_prefork_module": "mod_mpm_prefork.so",
            "authz_core_module": "mod_authz_core.so",
            "dir_module": "mod_dir.so",
            "mime_module": "mod_mime.so",
            "env_module": "mod_env.so",
            "proxy_module": "mod_proxy.so",
            "proxy_http_module": "mod_proxy_http.so",
        }
        lines = [f"LoadModule {name} {MODULES}/{file}" for name, file in modules.items()]
        lines += [
            f"LoadModule php_module {php}",
            f"PidFile {base}/apache.pid",
            f"Mutex file:{base} default",
            f"ErrorLog {base}/apache-error.log",
            "LogLevel warn",
            *([f"Timeout {timeout}"] if timeout else []),
            "ServerName 127.0.0.1",
            f"Listen 127.0.0.1:{port}",
            "TypesConfig /etc/mime.types",
            "StartServers 2",
            "<FilesMatch \\.php$>\n    SetHandler application/x-httpd-php\n</FilesMatch>",
            *(["User www-data", "Group www-data"] if AS_ROOT else []),
            f"Include {DEPLOY}/apache/wsboard.conf",
        ]
        conf = os.path.join(base, "httpd.conf")
        with open(conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        defines = {
            "WSBOARD_UPSTREAM": f"127.0.0.1:{upstream_port}",
            "WSBOARD_LISTEN": str(port),
            "WSBOARD_DOCROOT": site["docroot"],
            "WSBOARD_CONTROL": site["control"],
            "WSBOARD_SECRET_FILE": site["secret"],
        }
        args = [APACHE, "-f", conf, "-DFOREGROUND"]
        for name, value in defines.items():
            args += ["-C", f"Define {name} {value}"]
        proc = subprocess.Popen(  # its own session: Apache signals its whole process group
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        started.append(proc)
        url = f"http://127.0.0.1:{port}"

        wait_until(lambda: serving(url, proc, f"{base}/apache-error.log"), what="apache2")
        return url

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=10)


def serving(url: str, proc: subprocess.Popen, log: str, path: str = "/page.js") -> bool:
    """Whether the proxy at url serves path yet; it must not have exited."""
    if proc.poll() is not None:
        logged = open(log).read() if os.path.exists(log) else ""
        raise AssertionError(f"{proc.args[0]} exited with {proc.returncode}: {logged}")
    try:
        with urllib.request.urlopen(url + path, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def from_other_address(url: str, **kwargs) -> websocket.WebSocket:
    """A WebSocket opened from 127.0.0.2, so the proxy's X-Forwarded-For differs from its own
    address."""
    sock = socket.socket()
    sock.bind(("127.0.0.2", 0))
    parts = urllib.parse.urlsplit(url)
    sock.connect((parts.hostname, parts.port))
    return websocket.create_connection(url, socket=sock, timeout=10, **kwargs)


def signed_url(proxy_url: str, client_id: str) -> str:
    query = wsboard.signed_query(SECRET.encode(), client_id, 600)
    return proxy_url.replace("http://", "ws://") + "/websocket?" + query


def push(url: str, client_id: str, text: str) -> dict:
    body = urllib.parse.urlencode({"id": client_id, "text": text}).encode()
    with urllib.request.urlopen(url + "/push.php", data=body, timeout=10) as response:
        return json.loads(response.read())


def test_a_php_page_under_apache_pushes_to_chromium_through_the_proxy(
    browser,  # noqa: F811
    server_factory,
    site,
    apache,
):
    server = lamp_server(server_factory, site)
    url = apache(server.port)
    browser.get(url + "/")
    wait(browser, lambda d: d.find_element(By.ID, "status").text == "connected")
    client_id = browser.find_element(By.ID, "client_id").text
    assert push(url, client_id, "pushed by PHP under Apache") == {"ok": True, "error": None}
    wait(
        browser,
        lambda d: (
            [li.text for li in d.find_elements(By.CSS_SELECTOR, "#messages li")]
            == ["pushed by PHP under Apache"]
        ),
    )
    assert push(url, "nobody-here", "x") == {"ok": False, "error": "Client Not Found"}
    if AS_ROOT:  # the pushes came from PHP running as www-data, through the socket's group
        users = subprocess.run(
            ["ps", "-o", "user=", "-C", "apache2"], capture_output=True, text=True
        ).stdout.split()
        assert "www-data" in users
        assert os.stat(site["control"]).st_gid == wsboard._group("www-data")
        assert oct(os.stat(site["control"]).st_mode & 0o777) == "0o660"


def test_a_php_session_decides_who_connects_with_no_token_in_the_url(
    browser,  # noqa: F811
    server_factory,
    site,
    apache,
):
    """deploy/apache/www/connect.php is the hook: a browser that logged in (login.php) connects
    on its PHP session alone and gets what is sent to its user; one that did not is refused."""
    port = free_port()
    hook = f"http://127.0.0.1:{port}/connect.php"
    server = server_factory("--trusted-proxies", "127.0.0.1", "--connect-url", hook)
    url = apache(server.port, port)
    browser.get(url + "/session.php")  # no session yet
    wait(browser, lambda d: d.find_element(By.ID, "status").text.startswith("closed"))
    assert server.control().list() == []
    assert "Refused by the app: not logged in" in server.log()
    browser.get(url + "/login.php?user=ann-7")
    wait(browser, lambda d: d.find_element(By.ID, "status").text == "connected")
    assert browser.find_element(By.ID, "client_id").text == "ann-7"
    assert server.wait_listed(1)[0].startswith("ann-7 ")
    control = server.control()
    assert control.ask("SEND MESSAGE ann-7 for ann") == "OK"
    assert control.ask("PUBLISH private-user-ann-7 only ann's") == "OK 1"
    wait(
        browser,
        lambda d: (
            [li.text for li in d.find_elements(By.CSS_SELECTOR, "#messages li")]
            == ["for ann", "only ann's"]
        ),
    )
    (row,) = ask_json(control, {"op": "list"})["clients"]
    assert row["meta"] == {"name": "ann-7"}


def test_origin_checks_signed_ids_and_forwarded_addresses_hold_through_apache(
    server_factory, site, apache
):
    server = lamp_server(server_factory, site)
    assert_proxied(server, apache(server.port), "via-apache")


def assert_proxied(server, url: str, client_id: str) -> None:
    """Through the proxy at url: a signed socket from 127.0.0.2 is listed with that address
    (X-Forwarded-For from a trusted proxy) and gets what is sent; a foreign Origin and an
    unsigned id are refused with 403."""
    ws = from_other_address(signed_url(url, client_id))
    assert server.wait_listed(1)[0].startswith(f"{client_id} 127.0.0.2:")
    control = server.control()
    assert control.ask(f"SEND MESSAGE {client_id} through the proxy") == "OK"
    assert ws.recv() == "through the proxy"
    control.close()
    ws.close()
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        from_other_address(signed_url(url, "evil"), origin="http://evil.example")
    assert refused.value.status_code == 403
    with pytest.raises(websocket.WebSocketBadStatusException) as unsigned:
        from_other_address(url.replace("http://", "ws://") + "/websocket?id=unsigned")
    assert unsigned.value.status_code == 403
    # The event stream, passed on unbuffered: each event as it is sent.
    port = urllib.parse.urlsplit(url).port
    query = wsboard.signed_query(SECRET.encode(), "streamed", 600)
    stream = Stream(port, query, source="127.0.0.2")
    assert stream.status == 200 and stream.headers["content-type"].startswith("text/event-stream")
    assert stream.event()["event"] == "hello"
    listed = [row for row in server.control().list() if row.startswith("streamed ")]
    assert listed and listed[0].startswith("streamed 127.0.0.2:")
    control = server.control()
    for n in range(3):
        assert control.ask(f"SEND MESSAGE streamed event {n}") == "OK"
        assert stream.event() == {"data": f"event {n}"}  # before the next is sent: no buffer
    stream.close()
    assert Stream(port, "id=unsigned", source="127.0.0.2").status == 403


def start_nginx(base: str, site_conf: str) -> subprocess.Popen:
    """nginx in the foreground with site_conf as its one server, as root drops to www-data."""
    with open(os.path.join(base, "site.conf"), "w") as f:
        f.write(site_conf)
    temp = " ".join(
        f"{kind}_temp_path {base}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = os.path.join(base, "nginx.conf")
    with open(conf, "w") as f:
        f.write(
            ("user www-data;\n" if AS_ROOT else "")
            + f"daemon off;\npid {base}/nginx.pid;\nerror_log {base}/nginx-error.log;\n"
            + "events {}\n"
            + f"http {{ access_log off; {temp} include {base}/site.conf; }}\n"
        )
    return subprocess.Popen(
        [NGINX, "-c", conf, "-e", f"{base}/nginx-error.log"], start_new_session=True
    )


def test_a_page_behind_a_proxy_that_drops_upgrades_gets_its_messages_by_the_event_stream(
    browser,  # noqa: F811
    server_factory,
    site,
):
    """A plain proxy, as a middlebox is: it passes requests on but not the Upgrade header,
    so the WebSocket handshake fails; wsboard.js falls back to /events."""
    server = server_factory("--trusted-proxies", "127.0.0.1")
    port = free_port()
    proc = start_nginx(
        site["base"],
        f"server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass "
        f"http://127.0.0.1:{server.port}; proxy_http_version 1.1; proxy_set_header Host "
        "$http_host; proxy_buffering off; } }\n",
    )
    try:
        url = f"http://127.0.0.1:{port}"
        log = site["base"] + "/nginx-error.log"
        wait_until(lambda: serving(url, proc, log, "/"), what="nginx")
        browser.get(url + "/")
        wait(browser, lambda d: d.find_element(By.ID, "status").text == "connected", timeout=30)
        assert browser.execute_script("return document.body.dataset.transport") == "events"
        board_id = browser.find_element(By.ID, "boardId").text
        assert server.wait_listed(1)[0].startswith(board_id + " ")
        control = server.control()
        for text in ("first", "second"):
            assert control.ask(f"SEND MESSAGE {board_id} " + json.dumps({"message": text})) == "OK"
        wait(browser, lambda d: messages(d) == ["first", "second"])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow  # holds streams idle past the proxies' timeouts
def test_pings_keep_an_idle_stream_open_through_apache_and_nginx_past_their_timeouts(
    server_factory, site, apache
):
    """The proxies' idle limits, shrunk to 3 s (Apache's Timeout, nginx's
    proxy_read_timeout in the shipped file), against pings every second: an idle stream
    outlives them; without pings the proxy cuts it."""
    server = server_factory("--ping-interval", "1", "--trusted-proxies", "127.0.0.1")
    quiet = server_factory(
        "--ping-interval", "0", "--control", os.path.join(site["base"], "quiet.sock")
    )
    apache_port = urllib.parse.urlsplit(apache(server.port, timeout=3)).port
    with open(os.path.join(DEPLOY, "nginx", "wsboard.conf")) as f:
        shipped = f.read()
    nginx_port, quiet_port = free_port(), free_port()
    for old, new in (
        ("server 127.0.0.1:8080;", f"server 127.0.0.1:{server.port};"),
        ("listen 80;", f"listen 127.0.0.1:{nginx_port};"),
        ("root /var/www/wsboard;", f"root {site['docroot']};"),
        ("proxy_read_timeout 75s;", "proxy_read_timeout 3s;"),
    ):
        assert old in shipped
        shipped = shipped.replace(old, new)
    shipped += (  # the same location, to a server that does not ping
        f"server {{ listen 127.0.0.1:{quiet_port}; location /events {{ proxy_pass "
        f"http://127.0.0.1:{quiet.port}; proxy_http_version 1.1; proxy_buffering off; "
        "proxy_read_timeout 3s; } }\n"
    )
    proc = start_nginx(site["base"], shipped)
    try:
        log = site["base"] + "/nginx-error.log"
        wait_until(lambda: serving(f"http://127.0.0.1:{nginx_port}", proc, log), what="nginx")
        streams = [Stream(p, f"id=idle-{p}") for p in (apache_port, nginx_port)]
        cut = Stream(quiet_port, "id=unpinged")
        for stream in (*streams, cut):
            assert stream.event()["event"] == "hello"
        time.sleep(7)  # idle for more than twice the limit, but for the pings
        control = server.control()
        for stream in streams:
            assert control.ask(f"SEND MESSAGE idle-{stream.sock.getpeername()[1]} alive") == "OK"
        for stream in streams:
            assert stream.event() == {"data": "alive"}  # the pings before it were comments
        assert quiet.control().ask("SEND MESSAGE unpinged lost") in ("OK", "ERROR Client Not Found")
        with pytest.raises((EOFError, OSError)):
            while True:
                cut.event()  # nginx cut it: it ends before any "lost" comes
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_nginx_runs_the_shipped_config(server_factory, site):
    server = lamp_server(server_factory, site)
    port, base = free_port(), site["base"]
    with open(os.path.join(DEPLOY, "nginx", "wsboard.conf")) as f:
        shipped = f.read()
    for old, new in (
        ("server 127.0.0.1:8080;", f"server 127.0.0.1:{server.port};"),
        ("listen 80;", f"listen 127.0.0.1:{port};"),
        ("root /var/www/wsboard;", f"root {site['docroot']};"),
    ):
        assert old in shipped  # the test changes the ports and the root, nothing else
        shipped = shipped.replace(old, new)
    proc = start_nginx(base, shipped)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: serving(url, proc, f"{base}/nginx-error.log"), what="nginx")
        assert_proxied(server, url, "via-nginx")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not on this machine")
    with open(os.path.join(DEPLOY, "systemd", "wsboard.service")) as f:
        unit = f.read()
    executable = shutil.which("wsboard")
    assert executable, "the wsboard command is installed with the project"
    assert "ExecStart=/opt/wsboard/.venv/bin/wsboard\n" in unit
    (tmp_path / "wsboard.service").write_text(
        unit.replace("/opt/wsboard/.venv/bin/wsboard", executable)
    )
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "wsboard.service")], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    for setting in (
        "RuntimeDirectory=wsboard",
        "Group=www-data",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ):
        assert setting in unit
