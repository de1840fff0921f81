// The board page: one WebSocket to the server that served the page, under the board's id
// (with the server-minted exp and token when ids are signed).
// Every pushed message is shown as text (never as HTML): its "message" field when it is
// JSON that has one, else the raw text.
(function () {
  "use strict";
  var boardIdElement = document.getElementById("boardId");
  var query = boardIdElement.dataset.query || "id=" + encodeURIComponent(boardIdElement.textContent);
  var board = document.getElementById("message_board");
  var status = document.getElementById("status");
  var scheme = location.protocol === "https:" ? "wss:" : "ws:";

  function textOf(data) {
    try {
      var parsed = JSON.parse(data);
      if (parsed !== null && typeof parsed === "object" && "message" in parsed) {
        return typeof parsed.message === "string" ? parsed.message : JSON.stringify(parsed.message);
      }
    } catch (e) {
      // not JSON: show it as it came
    }
    return String(data);
  }

  var ws = new WebSocket(scheme + "//" + location.host + "/websocket?" + query);
  ws.onopen = function () {
    status.textContent = "connected";
  };
  ws.onclose = function (event) {
    status.textContent = "disconnected (code " + event.code + "); reload the page to reconnect";
  };
  ws.onmessage = function (event) {
    var line = document.createElement("div");
    line.className = "message";
    line.textContent = textOf(event.data);
    board.appendChild(line);
  };
})();
