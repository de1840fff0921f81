<?php
// POST id=<client id>&text=<message>: pushes through the control socket, as www-data.
// Answers {"ok": bool, "error": string|null}. A real app would check who may push.
require __DIR__ . '/wsboard-client/autoload.php';

header('Content-Type: application/json');
if ($_SERVER['REQUEST_METHOD'] !== 'POST' || !isset($_POST['id'], $_POST['text'])) {
    http_response_code(400);
    echo json_encode(['ok' => false, 'error' => 'POST id and text']);
    exit;
}
try {
    $board = new Wsboard\Client(getenv('WSBOARD_CONTROL') ?: null);
    $sent = $board->send($_POST['id'], $_POST['text']);
    echo json_encode(['ok' => $sent, 'error' => $sent ? null : 'Client Not Found']);
} catch (Wsboard\Exception\WsboardException $e) {
    http_response_code(503);
    echo json_encode(['ok' => false, 'error' => get_class($e) . ': ' . $e->getMessage()]);
}
