<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>Message Board</title>
  <link rel="stylesheet" href="/static/wsboard.css">
</head>
<body>
  <h2>Message Board</h2>
  <div><h3>Board Id:</h3><span id="boardId" data-query="{{query}}">{{board_id}}</span></div>
  <p id="status" role="status">connecting…</p>
  <p>Connection: <span id="connection"></span></p>
  <div id="presence" hidden><h3>Here now</h3><ul id="members"></ul></div>
  <div id="message_board" aria-live="polite"></div>
  <script src="/static/wsboard.js"></script>
  <script src="/static/board.js"></script>
</body>
</html>
