<?php
// A page served by Apache that connects to wsboard through Apache's proxy (/websocket on
// this very host and port) under a fresh client id, signed with the secret in the file
// WSBOARD_SECRET_FILE names (the one wsboard reads with --secret-file), if there is one.
require __DIR__ . '/wsboard-client/autoload.php';

$id = bin2hex(random_bytes(8));
$secretFile = getenv('WSBOARD_SECRET_FILE') ?: '';
$secret = $secretFile !== '' && is_readable($secretFile) ? trim(file_get_contents($secretFile)) : '';
$query = $secret !== '' ? Wsboard\Client::signedQuery($secret, $id, 3600) : 'id=' . $id;
header('Content-Type: text/html; charset=utf-8');
?>
<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>wsboard through Apache</title></head>
<body>
<p>Client id <code id="client_id"><?= htmlspecialchars($id) ?></code>: <span id="status">connecting</span></p>
<ul id="messages"></ul>
<script id="wsboard" data-query="<?= htmlspecialchars($query) ?>" src="page.js"></script>
</body>
</html>
