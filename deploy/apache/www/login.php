<?php
// A stand-in for the site's own login: it puts the user in the PHP session, then shows the
// page that connects on that session alone (session.php).
session_start();
$user = (string) ($_GET['user'] ?? '');
if (!preg_match('/^[A-Za-z0-9_.:-]{1,64}$/', $user)) {
    http_response_code(400);
    exit("a user name, please\n");
}
session_regenerate_id(true);
$_SESSION['user'] = $user;
header('Location: session.php');
