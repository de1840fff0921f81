// Connects to ws(s)://<this host>/websocket: the same origin as the page, through the proxy.
(function () {
  "use strict";
  var query = document.getElementById("wsboard").getAttribute("data-query");
  var scheme = location.protocol === "https:" ? "wss://" : "ws://";
  var ws = new WebSocket(scheme + location.host + "/websocket?" + query);
  ws.onopen = function () { document.getElementById("status").textContent = "connected"; };
  ws.onclose = function (event) { document.getElementById("status").textContent = "closed " + event.code; };
  ws.onmessage = function (event) {
    var li = document.createElement("li");
    li.textContent = event.data;
    document.getElementById("messages").appendChild(li);
  };
})();
