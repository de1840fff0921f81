"""The pages in a real browser: Debian's headless Chromium driven by Selenium."""

import functools
import http.server
import json
import os
import shutil
import threading
from urllib.parse import parse_qs

import pytest
import websocket
from conftest import free_port
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path}/chrome",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait(driver, condition, timeout=15):
    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def open_board(browser, server) -> str:
    browser.get(server.url + "/")
    wait(browser, lambda d: d.find_element(By.ID, "status").text == "connected")
    return browser.find_element(By.ID, "boardId").text


def messages(browser) -> list:
    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#message_board .message")]


def test_the_board_page_connects_under_its_board_id(browser, server):
    board_id = open_board(browser, server)
    assert len(board_id) == 10 and board_id.isalnum()
    rows = server.wait_listed(1)
    assert rows[0].startswith(board_id + " 127.0.0.1:")


def test_a_pushed_message_is_shown_as_text_never_as_html(browser, server):
    board_id = open_board(browser, server)
    server.wait_listed(1)
    control = server.control()
    hostile = "hello <b>bold</b> <img src=x onerror=\"document.title='pwned'\"> & caf\u00e9"
    assert control.ask(f"SEND MESSAGE {board_id} " + json.dumps({"message": hostile})) == "OK"
    assert control.ask(f"SEND MESSAGE {board_id} plain text, not JSON") == "OK"
    assert control.ask(f"SEND MESSAGE {board_id} " + json.dumps({"other": 1})) == "OK"
    wait(browser, lambda d: len(messages(d)) == 3)
    assert messages(browser) == [hostile, "plain text, not JSON", '{"other": 1}']
    board = browser.find_element(By.ID, "message_board")
    assert board.find_elements(By.TAG_NAME, "b") == []
    assert board.find_elements(By.TAG_NAME, "img") == []
    assert browser.title != "pwned"


def choose_client(browser, client_id: str) -> bool:
    """Choose client_id in the admin page's list, once the page has filled it (it fills and
    redraws it as the state and events come)."""
    try:
        Select(browser.find_element(By.ID, "clients")).select_by_value(client_id)
        return True
    except (NoSuchElementException, StaleElementReferenceException):
        return False


def test_the_admin_page_sends_a_message_to_a_board(browser, server):
    board_id = open_board(browser, server)
    board_window = browser.current_window_handle
    server.wait_listed(1)
    browser.switch_to.new_window("tab")
    browser.get(server.url + "/admin")
    wait(browser, lambda d: client_ids_shown(d) == [board_id])
    wait(browser, lambda d: choose_client(d, board_id))
    browser.find_element(By.ID, "message").send_keys("sent from the admin page <i>as text</i>")
    browser.find_element(By.ID, "send_message").click()
    wait(browser, lambda d: d.find_element(By.ID, "result").text == "Message sent")
    browser.switch_to.window(board_window)
    wait(browser, lambda d: messages(d) == ["sent from the admin page <i>as text</i>"])


def test_the_admin_page_reports_a_client_that_has_gone(browser, server):
    ws = server.websocket("soon-gone")
    server.wait_listed(1)
    browser.get(server.url + "/admin")
    ws.close()
    server.wait_listed(0)
    browser.find_element(By.ID, "message").send_keys("too late")
    browser.find_element(By.ID, "send_message").click()
    wait(browser, lambda d: d.find_element(By.ID, "result").text == "Error: Client Not Found")


def test_the_board_page_shows_when_the_server_goes_away(browser, server):
    open_board(browser, server)
    server.wait_listed(1)
    assert server.stop() == 0
    wait(
        browser, lambda d: d.find_element(By.ID, "status").text.startswith("reconnecting (code 10")
    )


SECRET = "browser-test-secret-0123456789"


def test_a_signed_board_page_connects_with_its_server_minted_token(browser, server_factory):
    server = server_factory(env={"WSBOARD_SECRET": SECRET})
    board_id = open_board(browser, server)
    server.wait_listed(1)
    assert server.control().ask(f"SEND MESSAGE {board_id} signed and delivered") == "OK"
    wait(browser, lambda d: messages(d) == ["signed and delivered"])
    assert "token=" not in server.log().replace("token=***", "")


def test_the_admin_page_works_behind_a_password(browser, server_factory):
    server = server_factory(env={"WSBOARD_ADMIN_PASSWORD": "browser admin password"})
    ws = server.websocket("behind-auth")
    server.wait_listed(1)
    browser.get(f"http://admin:browser%20admin%20password@127.0.0.1:{server.port}/admin")
    wait(browser, lambda d: choose_client(d, "behind-auth"))
    browser.find_element(By.ID, "message").send_keys("with a password")
    browser.find_element(By.ID, "send_message").click()
    wait(browser, lambda d: d.find_element(By.ID, "result").text not in ("", "sending…"))
    assert browser.find_element(By.ID, "result").text == "Message sent", server.log()
    assert json.loads(ws.recv()) == {"message": "with a password"}


@pytest.fixture
def foreign_site(tmp_path):
    """A page on another origin (another port), served by a plain server with no CSP."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<!DOCTYPE html><title>elsewhere</title>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=tmp_path / "site")
    site = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{site.server_address[1]}/index.html"
    site.shutdown()


def test_a_page_from_another_origin_cannot_open_a_websocket(browser, server, foreign_site):
    browser.get(foreign_site)
    browser.execute_script(
        "window.result = 'pending';"
        f"var ws = new WebSocket('ws://127.0.0.1:{server.port}/websocket?id=hijack');"
        "ws.onopen = function () { window.result = 'open'; };"
        "ws.onerror = function () { window.result = 'refused'; };"
    )
    wait(browser, lambda d: d.execute_script("return window.result") != "pending")
    assert browser.execute_script("return window.result") == "refused"
    assert server.control().list() == []
    wait(browser, lambda d: "Origin not allowed" in server.log())


def test_the_board_page_resumes_after_a_drop_and_misses_nothing(browser, server_factory):
    server = server_factory("--inbox", "50")
    board_id = open_board(browser, server)
    control = server.control()
    assert control.ask(f"SEND MESSAGE {board_id} one") == "OK"
    wait(browser, lambda d: messages(d) == ["one"])
    kick = {"op": "kick", "id": board_id, "code": 1012, "reason": "moving you"}
    assert json.loads(control.ask(json.dumps(kick)))["ok"] is True
    for text in ("two", "three"):  # while it is away, or just back: either way, once each
        send = {"op": "send", "to": board_id, "data": text}
        assert json.loads(control.ask(json.dumps(send)))["ok"] is True
    wait(browser, lambda d: d.find_element(By.ID, "status").text == "connected")
    wait(browser, lambda d: messages(d) == ["one", "two", "three"])
    assert control.ask(f"SEND MESSAGE {board_id} four") == "OK"
    wait(browser, lambda d: messages(d) == ["one", "two", "three", "four"])


def test_the_board_page_reconnects_when_the_server_restarts(browser, server_factory):
    server = server_factory("--inbox", "50")
    board_id = open_board(browser, server)
    assert server.stop() == 0
    wait(browser, lambda d: d.find_element(By.ID, "status").text.startswith("reconnecting"))
    server.start()
    wait(browser, lambda d: d.find_element(By.ID, "status").text == "connected", timeout=30)
    server.wait_listed(1)
    assert server.control().ask(f"SEND MESSAGE {board_id} after the restart") == "OK"
    wait(browser, lambda d: messages(d) == ["after the restart"])


def test_the_board_page_shows_a_gap_when_messages_were_lost(browser, server_factory):
    server = server_factory("--inbox", "2")
    board_id = open_board(browser, server)
    control = server.control()
    kick = {"op": "kick", "id": board_id, "code": 1012, "reason": "away"}
    assert json.loads(control.ask(json.dumps(kick)))["ok"] is True
    server.wait_listed(0)
    for text in ("lost 1", "lost 2", "kept 3", "kept 4"):
        assert json.loads(control.ask(json.dumps({"op": "send", "to": board_id, "data": text})))[
            "ok"
        ]
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#message_board > div")) == 3)
    lines = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#message_board > div")]
    assert lines == ["Some messages were missed while this page was away.", "kept 3", "kept 4"]


# Channels and presence ########################################################


def open_tab(browser, url) -> str:
    """Open url in a new tab, wait for it to connect; return its window handle."""
    browser.switch_to.new_window("tab")
    browser.get(url)
    wait(browser, lambda d: d.find_element(By.ID, "status").text == "connected")
    wait(browser, lambda d: d.find_element(By.ID, "connection").text)
    return browser.current_window_handle


def control_json(server, request) -> dict:
    control = server.control()
    try:
        return json.loads(control.ask(json.dumps(request)))
    finally:
        control.close()


def test_two_board_pages_in_a_channel_and_one_left_out_by_its_connection_id(browser, server):
    first = open_tab(browser, server.url + "/?channel=ticket-9")
    first_conn = browser.find_element(By.ID, "connection").text
    second = open_tab(browser, server.url + "/?channel=ticket-9")
    server.wait_listed(2)
    request = {"op": "publish", "channel": "ticket-9", "data": json.dumps({"message": "to all"})}
    assert control_json(server, request)["sockets"] == 2
    others = {**request, "data": json.dumps({"message": "to others"}), "except": first_conn}
    assert control_json(server, others)["sockets"] == 1
    wait(browser, lambda d: messages(d) == ["to all", "to others"])
    browser.switch_to.window(first)
    assert control_json(server, {"op": "send", "conn": first_conn, "data": "sentinel"})["ok"]
    wait(browser, lambda d: messages(d) == ["to all", "sentinel"])  # never "to others"
    assert second != first


def test_a_board_page_shows_who_is_present(browser, server_factory):
    server = server_factory("--presence-grace", "0.5")
    watcher = open_tab(browser, server.url + "/?channel=presence-lobby")
    other = open_tab(browser, server.url + "/?channel=presence-lobby")
    other_id = browser.find_element(By.ID, "boardId").text
    assert control_json(server, {"op": "meta", "id": other_id, "meta": {"name": "Ada"}})["ok"]
    browser.switch_to.window(watcher)

    def shown(d):
        return sorted(e.text for e in d.find_elements(By.CSS_SELECTOR, "#members .member"))

    wait(browser, lambda d: len(shown(d)) == 2)
    browser.switch_to.window(other)
    browser.close()
    browser.switch_to.window(watcher)
    wait(browser, lambda d: len(shown(d)) == 1)
    assert other_id not in shown(browser)[0]


def test_the_admin_page_shows_channels_with_their_members_and_publishes_to_one(browser, server):
    board = open_tab(browser, server.url + "/?channel=presence-room&channel=news")
    board_id = browser.find_element(By.ID, "boardId").text
    browser.switch_to.new_window("tab")
    browser.get(server.url + "/admin")

    def channel_rows(d) -> set | None:
        try:
            return {
                tuple(td.text for td in row.find_elements(By.TAG_NAME, "td"))
                for row in d.find_elements(By.CSS_SELECTOR, "#channel_table tbody tr")
            }
        except StaleElementReferenceException:  # the page drew its table anew meanwhile
            return None

    wanted = {("news", "1", ""), ("presence-room", "1", board_id)}
    wait(browser, lambda d: channel_rows(d) == wanted)
    browser.find_element(By.ID, "channel").send_keys("news")
    browser.find_element(By.ID, "publish_message").send_keys("to the news channel")
    browser.find_element(By.ID, "publish_button").click()
    wait(
        browser,
        lambda d: d.find_element(By.ID, "publish_result").text == "Published to 1 socket(s)",
    )
    browser.switch_to.window(board)
    wait(browser, lambda d: messages(d) == ["to the news channel"])


def test_the_example_page_shows_its_room_members_and_messages(browser, server):
    ada = open_example(browser, server, "ada")
    open_example(browser, server, "bob")
    conn = browser.find_element(By.ID, "conn").text
    assert conn in [c["conn"] for c in control_json(server, {"op": "list"})["clients"]]
    assert control_json(server, {"op": "publish", "channel": "r1", "data": "hello room"})["ok"]
    assert control_json(server, {"op": "send", "conn": conn, "data": "just bob"})["ok"]
    wait(browser, lambda d: items(d, "messages") == ["hello room", "just bob"])
    assert items(browser, "members") == ["ada", "bob"]
    browser.switch_to.window(ada)
    wait(browser, lambda d: items(d, "members") == ["ada", "bob"])
    assert items(browser, "messages") == ["hello room"]


def open_example(browser, server, client_id) -> str:
    browser.switch_to.new_window("tab")
    browser.get(f"{server.url}/static/example.html?id={client_id}&room=r1")
    wait(browser, lambda d: d.find_element(By.ID, "status").text == "connected")
    wait(browser, lambda d: d.find_element(By.ID, "conn").text)
    return browser.current_window_handle


def items(browser, list_id) -> list:
    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, f"#{list_id} li")]


# Laravel Echo on pusher-js in the browser, as a Laravel app's page uses it: the page comes
# from the app's origin, its /broadcasting/auth signs channels with the real Python SDK.

ECHO_PAGE = """<!doctype html>
<meta charset="utf-8"><title>Echo</title>
<script src="/pusher.min.js"></script><script src="/echo.iife.js"></script>
<ul id="seen"></ul>
<script>
const params = new URLSearchParams(location.search), user = params.get("user");
function saw(text) {
  const li = document.createElement("li"); li.textContent = text;
  document.getElementById("seen").appendChild(li);
}
window.echo = new Echo.default({
  broadcaster: "reverb", key: "%(key)s", wsHost: "127.0.0.1", wsPort: %(port)d,
  forceTLS: false, enabledTransports: ["ws"], authEndpoint: "/broadcasting/auth",
  auth: {headers: {"X-User": user}},
  userAuthentication: {endpoint: "/broadcasting/user-auth", headers: {"X-User": user}},
});
if (params.get("signin")) {  // pusher.signin(): events sent to this user reach the page
  echo.connector.signin();
  echo.connector.pusher.user.bind("Note", (e) => saw("note " + e.text));
  echo.channel("news")
    .on("pusher:subscription_count", (e) => saw("news count " + e.subscription_count));
}
echo.connector.pusher.connection.bind("connected", () => saw("connected"));
echo.channel("news").listen(".Posted", (e) => saw("news " + e.title));
echo.private("App.Models.User." + user).listen(".Ping", (e) => saw("ping " + e.n));
echo.join("room")
  .here((users) => saw("here " + users.map((u) => u.name).sort().join(",")))
  .joining((u) => saw("joining " + u.name))
  .leaving((u) => saw("leaving " + u.name));
</script>
"""


@pytest.fixture
def laravel_app(tmp_path):
    """A stand-in for the Laravel app: its page, the npm builds, and /broadcasting/auth
    answered by the real pusher SDK's authenticate (users 1 Ann, 2 Bob)."""
    import pusher as pusher_sdk
    from test_pusher import APP_ID, KEY, NODE_MODULES, SECRET

    files = {
        "/pusher.min.js": os.path.join(NODE_MODULES, "pusher-js", "dist", "web", "pusher.min.js"),
        "/echo.iife.js": os.path.join(NODE_MODULES, "laravel-echo", "dist", "echo.iife.js"),
    }
    names = {"1": "Ann", "2": "Bob"}
    state = {"ws_port": 0, "auth_requests": 0}

    class App(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def answer(self, status, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            path = self.path.split("?")[0]
            if path == "/page":
                page = ECHO_PAGE % {"key": KEY, "port": state["ws_port"]}
                return self.answer(200, page.encode(), "text/html; charset=utf-8")
            if path in files:
                with open(files[path], "rb") as f:
                    return self.answer(200, f.read(), "text/javascript")
            return self.answer(404, b"", "text/plain")

        def do_POST(self):
            form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
            user = self.headers.get("X-User", "")
            sdk = pusher_sdk.Pusher(APP_ID, KEY, SECRET, ssl=False)
            if self.path == "/broadcasting/user-auth" and user in names:  # sign-in
                state["signins"] = state.get("signins", 0) + 1
                who = {"id": user, "user_info": {"name": names[user]}}
                auth = sdk.authenticate_user(form["socket_id"][0], who)
                return self.answer(200, json.dumps(auth).encode(), "application/json")
            channel, socket_id = form["channel_name"][0], form["socket_id"][0]
            state["auth_requests"] += 1
            if channel.startswith("private-App.Models.User.") and channel.endswith("." + user):
                auth = sdk.authenticate(channel, socket_id)
            elif channel.startswith("presence-") and user in names:
                data = {"user_id": user, "user_info": {"name": names[user]}}
                auth = sdk.authenticate(channel, socket_id, data)
            else:
                return self.answer(403, b"{}", "application/json")
            return self.answer(200, json.dumps(auth).encode(), "application/json")

    site = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), App)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    site.state = state
    site.url = f"http://127.0.0.1:{site.server_address[1]}"
    yield site
    site.shutdown()


def seen(browser) -> list:
    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#seen li")]


def test_laravel_echo_in_chromium_receives_events_and_sees_who_is_present(
    browser, server_factory, laravel_app
):
    from test_pusher import PUSHER, sdk

    server = server_factory(*PUSHER, "--allowed-origins", laravel_app.url, "--presence-grace", "0")
    laravel_app.state["ws_port"] = server.port
    browser.get(f"{laravel_app.url}/page?user=1")
    ann = browser.current_window_handle
    wait(browser, lambda d: "here Ann" in seen(d))
    api = sdk(server)
    api.trigger("news", "Posted", {"title": "hello"})
    api.trigger("private-App.Models.User.1", "Ping", {"n": 1})
    wait(browser, lambda d: {"news hello", "ping 1"} <= set(seen(d)))
    browser.switch_to.new_window("tab")
    browser.get(f"{laravel_app.url}/page?user=2")
    wait(browser, lambda d: "here Ann,Bob" in seen(d))
    control = server.control()
    channels = json.loads(control.ask(json.dumps({"op": "channels"})))["channels"]
    control.close()
    assert channels == {
        "news": 2,
        "private-App.Models.User.1": 1,
        "private-App.Models.User.2": 1,
        "presence-room": 2,
    }
    browser.close()
    browser.switch_to.window(ann)
    wait(browser, lambda d: seen(d)[-2:] == ["joining Bob", "leaving Bob"])
    assert laravel_app.state["auth_requests"] == 4  # two private and two presence channels


def test_laravel_echo_in_chromium_signs_in_and_its_app_hears_of_it_by_webhook(
    browser, server_factory, laravel_app
):
    """Echo's signin() through the app's /broadcasting/user-auth; sendToUser reaches the
    page, and so do its channel's subscription counts; the app's webhook endpoint hears the
    channels and the member come and go."""
    from test_pusher import PUSHER, sdk
    from test_pusher_surface import Receiver

    hook = Receiver()
    server = server_factory(
        *PUSHER, "--allowed-origins", laravel_app.url, "--presence-grace", "0",
        "--pusher-webhook", hook.url, "--pusher-subscription-count", "yes",
    )  # fmt: skip
    laravel_app.state["ws_port"] = server.port
    try:
        browser.get(f"{laravel_app.url}/page?user=1&signin=1")
        wait(browser, lambda d: "here Ann" in seen(d) and "news count 1" in seen(d))
        hook.wait_for(name="member_added", channel="presence-room", user_id="1")
        other = websocket.create_connection(
            server.ws_url("other") + "&channel=news", origin=laravel_app.url
        )
        wait(browser, lambda d: "news count 2" in seen(d))  # a /websocket socket counts too
        other.close()
        control = server.control()
        wait(browser, lambda d: [c.get("user") for c in list_rows(control)] == ["1"])
        sdk(server).send_to_user("1", "Note", {"text": "for Ann alone"})
        wait(browser, lambda d: "note for Ann alone" in seen(d))
        assert laravel_app.state["signins"] == 1
        browser.execute_script("echo.disconnect()")  # Ann leaves, the channels empty
        wait(browser, lambda d: not list_rows(control))
        hook.wait_for(name="member_removed", channel="presence-room", user_id="1")
        hook.wait_for(name="channel_vacated", channel="news")
        occupied = [e["channel"] for e in hook.events if e["name"] == "channel_occupied"]
        assert sorted(occupied) == ["news", "presence-room", "private-App.Models.User.1"]
        control.close()
    finally:
        hook.close()


def list_rows(control) -> list:
    return json.loads(control.ask(json.dumps({"op": "list"})))["clients"]


# The live admin page.


def client_ids_shown(browser) -> list:
    """The ids in the clients table, read in one step (the page may redraw it meanwhile)."""
    return browser.execute_script(
        'return [...document.querySelectorAll("#client_table tbody tr")].map((r) => r.dataset.id)'
    )


def click_in_row(browser, index: int, button: str) -> str:
    """Click a button of the clients table's row index; return the row's connection id. The
    page redraws the table as events come, so a row found may go stale: try again."""

    def click(d):
        try:
            row = d.find_elements(By.CSS_SELECTOR, "#client_table tbody tr")[index]
            conn = row.get_attribute("data-conn")
            row.find_element(By.CSS_SELECTOR, button).click()
            return conn
        except StaleElementReferenceException:
            return None

    return wait(browser, click)


def test_the_admin_page_shows_a_new_client_without_a_reload_and_kicks_it(browser, server):
    browser.get(server.url + "/admin")
    wait(browser, lambda d: d.find_element(By.ID, "live").text == "live")
    assert client_ids_shown(browser) == []
    ws = server.websocket("walk-in", origin=server.url)
    wait(browser, lambda d: client_ids_shown(d) == ["walk-in"])
    assert browser.find_element(By.ID, "stat_sockets").text == "1"
    row = browser.find_element(By.CSS_SELECTOR, "#client_table tbody tr")
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    assert cells[4] == server.url and cells[5] == "plain" and cells[3].endswith(" s")
    conn = click_in_row(browser, 0, "button.kick")
    wait(browser, lambda d: d.find_element(By.ID, "result").text == f"Kicked {conn}")
    assert close_code(ws) == 4000  # wsboard.js does not reconnect after it
    wait(browser, lambda d: client_ids_shown(d) == [])
    assert browser.find_element(By.ID, "no_clients").is_displayed()


def close_code(ws) -> int:
    from conftest import close_frame

    return close_frame(ws)[0]


def test_the_admin_page_sends_to_one_connection_and_broadcasts(browser, server):
    first, second = server.websocket("twin"), server.websocket("twin")
    browser.get(server.url + "/admin")
    wait(browser, lambda d: client_ids_shown(d) == ["twin", "twin"])
    conn = click_in_row(browser, 1, "button.target")
    assert browser.find_element(By.ID, "conn").get_attribute("value") == conn
    browser.find_element(By.ID, "message").send_keys("only the second")
    browser.find_element(By.ID, "send_message").click()
    wait(browser, lambda d: d.find_element(By.ID, "result").text == "Message sent")
    assert json.loads(second.recv()) == {"message": "only the second"}
    browser.find_element(By.ID, "broadcast_message").send_keys("everyone")
    browser.find_element(By.ID, "broadcast_button").click()
    wait(
        browser,
        lambda d: d.find_element(By.ID, "broadcast_result").text == "Broadcast to 2 socket(s)",
    )
    assert json.loads(first.recv()) == {"message": "everyone"}  # the first got nothing before
    assert json.loads(second.recv()) == {"message": "everyone"}


def test_the_admin_page_filters_and_pages_its_clients(browser, server):
    sockets = [server.websocket(f"user-{n:03d}") for n in range(130)]
    server.wait_listed(130)
    browser.get(server.url + "/admin")
    wait(browser, lambda d: d.find_element(By.ID, "live").text == "live")
    wait(browser, lambda d: len(client_ids_shown(d)) == 100)
    assert browser.find_element(By.ID, "page_info").text == "1–100 of 130"
    browser.find_element(By.ID, "next").click()
    wait(browser, lambda d: d.find_element(By.ID, "page_info").text == "101–130 of 130")
    assert client_ids_shown(browser) == [f"user-{n:03d}" for n in range(100, 130)]
    assert not browser.find_element(By.ID, "next").is_enabled()
    browser.find_element(By.ID, "filter").send_keys("user-12")
    wait(browser, lambda d: d.find_element(By.ID, "page_info").text == "1–10 of 10 (130 in all)")
    assert client_ids_shown(browser) == [f"user-{n}" for n in range(120, 130)]
    for ws in sockets:
        ws.close()


@pytest.mark.parametrize("width, height, mobile", [(1280, 800, False), (390, 844, True)])
def test_the_admin_page_fits_desktop_and_phone_screens(
    browser, server, tmp_path, width, height, mobile
):
    sockets = [
        server.websocket(f"a-rather-long-client-id-{n}", origin=server.url) for n in range(3)
    ]
    control = server.control()
    control.ask('{"op":"meta","id":"a-rather-long-client-id-0","meta":{"name":"Ann","plan":"pro"}}')
    control.close()
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
    )
    browser.get(server.url + "/admin")
    wait(browser, lambda d: len(client_ids_shown(d)) == 3)
    shot = tmp_path / f"admin-{width}.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    layout = browser.execute_script(
        """
        const inside = (el) => { const r = el.getBoundingClientRect();
          return r.width > 0 && r.height > 0 && r.left >= 0 && r.right <= innerWidth + 0.5; };
        const scroller = document.querySelector(".scroll");
        const ids = ["filter", "clients", "message", "send_message", "channel", "publish_button",
                     "broadcast_message", "broadcast_button", "prev", "next"];
        return {
          page: document.documentElement.scrollWidth, viewport: innerWidth,
          outside: ids.filter((id) => !inside(document.getElementById(id))),
          kick: inside(document.querySelector("#client_table button.kick")) ||
                scroller.scrollWidth > scroller.clientWidth,
        };
        """
    )
    assert layout["viewport"] == width
    assert layout["page"] <= width, layout  # nothing makes the page scroll sideways
    assert layout["outside"] == [], layout  # every control is on the screen
    assert layout["kick"], layout  # reachable: on screen, or in the table's own scroller
    for ws in sockets:
        ws.close()


# Channel history: resume and render-to-connect ##############################


def test_the_board_page_resumes_its_channels_after_a_drop_and_misses_nothing(
    browser, server_factory
):
    server = server_factory("--history", "50")
    browser.get(server.url + "/?channel=news")
    wait(browser, lambda d: d.find_element(By.ID, "status").text == "connected")
    board_id = browser.find_element(By.ID, "boardId").text
    assert "since=news%3A" in browser.find_element(By.ID, "boardId").get_attribute("data-query")
    control = server.control()
    publish = {"op": "publish", "channel": "news", "data": json.dumps({"message": "one"})}
    assert json.loads(control.ask(json.dumps(publish)))["sockets"] == 1
    wait(browser, lambda d: messages(d) == ["one"])
    kick = {"op": "kick", "id": board_id, "code": 1012, "reason": "moving you"}
    assert json.loads(control.ask(json.dumps(kick)))["ok"] is True
    server.wait_listed(0)
    for text in ("two", "three"):  # while it is away: kept in the channel's history only
        publish["data"] = json.dumps({"message": text})
        assert json.loads(control.ask(json.dumps(publish)))["sockets"] == 0
    wait(browser, lambda d: d.find_element(By.ID, "status").text == "connected")
    wait(browser, lambda d: messages(d) == ["one", "two", "three"])
    publish["data"] = json.dumps({"message": "four"})
    assert json.loads(control.ask(json.dumps(publish)))["sockets"] == 1
    wait(browser, lambda d: messages(d) == ["one", "two", "three", "four"])


def test_wsboard_js_connects_from_a_rendered_position_and_gets_what_came_after(
    browser, server_factory
):
    server = server_factory("--history", "50")
    open_board(browser, server)  # a page that serves wsboard.js from the same origin
    control = server.control()
    control.ask("PUBLISH sport before-the-render")
    epoch, offset = control.ask("POSITION sport").split()[1:]  # what PHP renders in
    control.ask("PUBLISH sport after-the-render")  # before the page's socket exists
    script = """
        var done = arguments[arguments.length - 1];
        window.got = [];
        var url = "ws://" + location.host + "/websocket?id=renderer&channel=sport&since=" +
            encodeURIComponent(arguments[0]);
        window.client = WSBoard.connect(url, {
          onMessage: function (text, seq, offsets) { window.got.push([text, offsets]); },
          onStatus: function (state) { if (state === "connected") done(true); }
        });
    """
    assert browser.execute_async_script(script, f"sport:{epoch}:{offset}") is True
    wait(browser, lambda d: d.execute_script("return window.got.length") == 1)
    control.ask("PUBLISH sport live")
    wait(browser, lambda d: d.execute_script("return window.got.length") == 2)
    got = browser.execute_script("return window.got")
    assert got == [["after-the-render", {"sport": 2}], ["live", {"sport": 3}]]
    at = browser.execute_script("return window.client.channelPosition('sport')")
    assert at == {"epoch": epoch, "offset": 3}


# Token lifetime ###############################################################


def test_wsboard_js_refreshes_a_token_before_it_expires_and_stays_connected(
    browser, server_factory, tmp_path
):
    import time

    import wsboard_client

    secret = "a-long-enough-secret-for-tests"
    (tmp_path / "secret").write_text(secret)
    server = server_factory("--secret-file", str(tmp_path / "secret"))
    open_board(browser, server)  # a page of the server's origin to run wsboard.js in
    exp, later = int(time.time()) + 8, int(time.time()) + 120  # time enough to connect
    first = wsboard_client.mint_token(secret, "refresher", exp)
    fresh = {"exp": later, "token": wsboard_client.mint_token(secret, "refresher", later)}
    script = """
        var done = arguments[arguments.length - 1];
        window.got = [];
        window.states = [];
        var url = "ws://" + location.host + "/websocket?id=refresher&exp=" + arguments[0] +
            "&token=" + arguments[1];
        window.client = WSBoard.connect(url, {
          refresh: function (give) { window.asked = (window.asked || 0) + 1; give(window.fresh); },
          onMessage: function (text) { window.got.push(text); },
          onStatus: function (state) {
            window.states.push(state);
            if (state === "connected") done(window.client.connectionId);
          }
        });
    """
    browser.execute_script("window.fresh = arguments[0];", fresh)
    conn = browser.execute_async_script(script, exp, first)
    time.sleep(max(0, exp + 2 - time.time()))  # past the first token's exp
    assert browser.execute_script("return window.asked") == 1
    assert browser.execute_script("return window.states") == ["connecting", "connected"]
    assert browser.execute_script("return window.client.connectionId") == conn
    assert server.control().ask("SEND MESSAGE refresher after the first exp") == "OK"
    wait(browser, lambda d: d.execute_script("return window.got") == ["after the first exp"])


def test_wsboard_js_reconnects_with_a_fresh_token_when_it_could_not_refresh_in_time(
    browser, server_factory, tmp_path
):
    import time

    import wsboard_client

    secret = "a-long-enough-secret-for-tests"
    (tmp_path / "secret").write_text(secret)
    server = server_factory("--secret-file", str(tmp_path / "secret"), "--inbox", "10")
    open_board(browser, server)
    exp, later = int(time.time()) + 5, int(time.time()) + 120
    first = wsboard_client.mint_token(secret, "late", exp)
    fresh = {"exp": later, "token": wsboard_client.mint_token(secret, "late", later)}
    browser.execute_script("window.fresh = arguments[0];", fresh)
    conn = browser.execute_async_script(
        """
        var done = arguments[arguments.length - 1];
        window.got = [];
        window.states = [];
        window.asked = 0;
        var url = "ws://" + location.host + "/websocket?id=late&exp=" + arguments[0] +
            "&token=" + arguments[1];
        window.client = WSBoard.connect(url, {
          refresh: function (give) {
            window.asked++;
            give(window.asked > 1 ? window.fresh : null);  // in time: none; at 4001: one
          },
          onMessage: function (text) { window.got.push(text); },
          onStatus: function (state, code) {
            window.states.push(code ? state + " " + code : state);
            if (state === "connected" && window.states.length === 2) {
              done(window.client.connectionId);
            }
          }
        });
        """,
        exp,
        first,
    )
    wait(browser, lambda d: d.execute_script("return window.states").count("connected") == 2)
    assert "reconnecting 4001" in browser.execute_script("return window.states")
    assert browser.execute_script("return window.client.connectionId") != conn
    assert server.control().ask("SEND MESSAGE late on the fresh token") == "OK"
    wait(browser, lambda d: d.execute_script("return window.got") == ["on the fresh token"])
