"""The PHP library (clients/php) under Debian's phpunit, against the real server; and the
measure that it never busy-waits: a PHP process waiting 2 s for a late answer uses ~no CPU."""

import os
import resource
import socket
import subprocess
import threading
import time

from conftest import PHP, ROOT

import wsboard_client

LIBRARY = os.path.join(ROOT, "clients", "php")


def test_the_php_library_passes_its_phpunit_suite(server_factory):
    server = server_factory("--history", "10")
    query = wsboard_client.signed_query(b"s" * 32, "u", 60, ["news", "private-a"], now=1000)
    result = subprocess.run(
        [
            "phpunit",
            "--do-not-cache-result",
            "--configuration",
            os.path.join(LIBRARY, "phpunit.xml.dist"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "WSBOARD_CONTROL": server.control_path,
            "WSBOARD_TEST_PORT": str(server.port),
            "WSBOARD_TEST_SIGNED_QUERY": query,
        },
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK (10 tests" in result.stdout  # every test ran and passed: none skipped


def cpu_of_php_waiting(tmp_path, code: str) -> tuple:
    """(wall, CPU seconds) of a PHP process whose control socket answers PONG after 2 s."""
    path = str(tmp_path / "late.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)

    def late_server():
        conn, _ = listener.accept()
        conn.recv(100)
        time.sleep(2)
        conn.sendall(b"PONG\n")
        time.sleep(0.5)
        conn.close()

    threading.Thread(target=late_server, daemon=True).start()
    script = tmp_path / "wait.php"
    script.write_text(code.replace("PATH", path))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    subprocess.run([*PHP, str(script)], check=True, timeout=30, capture_output=True)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    listener.close()
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def test_waiting_for_a_late_answer_costs_no_cpu(tmp_path, terminal_notes):
    library = (
        f"<?php require '{LIBRARY}/autoload.php';\n"
        "$c = new Wsboard\\Client('PATH', 5.0);\n"
        "if (!$c->ping()) exit(1);\n"
    )
    wall, cpu = cpu_of_php_waiting(tmp_path, library)
    assert wall >= 2.0
    assert cpu < 0.25  # PHP's own start-up included; a spinning read would burn ~2 s
    terminal_notes.append(f"PHP library waiting {wall:.1f} s for a late answer: {cpu:.3f} s CPU")


def test_a_php_call_takes_at_most_its_timeout_however_slowly_the_answer_trickles(
    trickling_control, tmp_path
):
    script = tmp_path / "trickle.php"
    script.write_text(
        f"<?php require '{LIBRARY}/autoload.php';\n"
        "$c = new Wsboard\\Client($argv[1], 1.0);\n"
        "try { $c->ping(); echo 'answered'; }\n"
        "catch (Wsboard\\Exception\\TimeoutException $e) { echo 'timeout'; }\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [*PHP, str(script), trickling_control], capture_output=True, text=True, timeout=60
    )
    assert result.stdout == "timeout", result.stderr
    assert time.monotonic() - started < 10  # the answer alone takes 24 s to come whole


def test_the_php_client_reconnects_once_after_a_restart_and_tells_permission_apart(
    server_factory, tmp_path
):
    path = str(tmp_path / "restart.sock")
    first = server_factory("--control", path)
    flag = tmp_path / "restarted"
    script = tmp_path / "restart.php"
    script.write_text(
        f"<?php require '{LIBRARY}/autoload.php';\n"
        f"$c = new Wsboard\\Client('{path}', 5.0);\n"
        'echo $c->ping() ? "first\\n" : "no\\n";\n'
        f"while (!file_exists('{flag}')) usleep(50000);\n"
        'echo $c->ping() ? "second\\n" : "no\\n";\n'
    )
    proc = subprocess.Popen([*PHP, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "first\n"
    first.stop()
    server_factory("--control", path)
    flag.write_text("")
    assert proc.stdout.readline() == "second\n"
    assert proc.wait(timeout=10) == 0
    guarded = server_factory(
        "--control", str(tmp_path / "guarded.sock"), "--control-uids", str(os.getuid() + 1)
    )
    script.write_text(
        f"<?php require '{LIBRARY}/autoload.php';\n"
        "try { (new Wsboard\\Client($argv[1]))->stats(); }\n"
        "catch (Wsboard\\Exception\\PermissionDeniedException $e) { echo 'denied'; }\n"
    )
    denied = subprocess.run(
        [*PHP, str(script), guarded.control_path], capture_output=True, text=True
    )
    assert denied.stdout == "denied", denied.stderr
