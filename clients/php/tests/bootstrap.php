<?php
// The library without Composer (as a LAMP app may use it), and the test's own WebSocket.
require __DIR__ . '/../autoload.php';
require __DIR__ . '/Browser.php';
