<?php
// A page that connects with no id and no token in its URL: wsboard asks connect.php, which
// reads this browser's PHP session (wsboard runs with --connect-url .../connect.php).
session_start(['read_and_close' => true]);
$user = $_SESSION['user'] ?? '';
header('Content-Type: text/html; charset=utf-8');
?>
<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>wsboard on the PHP session</title></head>
<body>
<p>Signed in as <code id="client_id"><?= htmlspecialchars($user) ?></code>: <span id="status">connecting</span></p>
<ul id="messages"></ul>
<script id="wsboard" data-query="" src="page.js"></script>
</body>
</html>
