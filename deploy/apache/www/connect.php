<?php
// wsboard's connect hook: start wsboard with --connect-url http://127.0.0.1/connect.php and
// it POSTs each browser's handshake here, with that browser's own cookies, before it
// connects. The PHP session then says who connects, so the page needs no token in its URL.
// Answer 200 with the id (and the channels it may be in, meta, an exp), or 401/403 to refuse.
session_start(['read_and_close' => true]);  // read the session; hold no lock on it
header('Content-Type: application/json');
$user = $_SESSION['user'] ?? null;
if ($user === null) {
    http_response_code(401);
    echo json_encode(['reason' => 'not logged in']);
    exit;
}
$asked = json_decode(file_get_contents('php://input'), true);  // {"id", "channels", "peer", ...}
echo json_encode([
    'id' => $user,
    'channels' => ["private-user-$user"],  // granted: no token needed for them
    'meta' => ['name' => $_SESSION['name'] ?? $user],
]);
