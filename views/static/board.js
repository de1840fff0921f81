// The board page: connects to the server that served it under the board's id (with the
// server-minted exp and token when ids are signed), through wsboard.js, which reconnects
// and resumes. Every message is shown as text (never as HTML): its "message" field when
// it is JSON that has one, else the raw text.
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

  function append(className, text) {
    var line = document.createElement("div");
    line.className = className;
    line.textContent = text;
    board.appendChild(line);
  }

  var memberList = document.getElementById("members");
  var client = WSBoard.connect(scheme + "//" + location.host + "/websocket?" + query, {
    onMessage: function (data) {
      append("message", textOf(data));
    },
    onPresence: function (channel, members) {
      document.getElementById("presence").hidden = false;
      memberList.textContent = "";
      members.forEach(function (member) {
        var item = document.createElement("li");
        item.className = "member";
        item.textContent = member.meta && typeof member.meta.name === "string"
          ? member.meta.name + " (" + member.id + ")" : member.id;
        memberList.appendChild(item);
      });
    },
    onGap: function () {
      append("notice", "Some messages were missed while this page was away.");
    },
    onStatus: function (state, code) {
      if (state === "reconnecting") {
        status.textContent = "reconnecting (code " + code + ")…";
      } else if (state === "closed") {
        status.textContent = "disconnected (code " + code + "); reload the page to reconnect";
      } else {
        status.textContent = state;
      }
      if (state === "connected") {
        document.getElementById("connection").textContent = client.connectionId || "";
        document.body.dataset.transport = client.transport;  // "websocket" or "events"
      }
    }
  });
})();
