// A complete page on wsboard.js: a room with who is in it and what is said there.
//
// Open /static/example.html?id=ada&room=lobby. Your backend then pushes with
//   PUBLISH lobby <text>              (everyone in the room)
//   SEND MESSAGE ada <text>           (every tab of ada)
//   {"op":"send","conn":"<conn id>"}  (this one tab; the page shows its connection id)
// and sees who is here with {"op":"presence","channel":"presence-lobby"}. With --secret, the
// page would get its query (id, channels, exp, token) from your backend instead: see
// wsboard_client.signed_query and Wsboard\Client::signedQuery.
(function () {
  "use strict";

  var params = new URLSearchParams(location.search);
  var id = params.get("id") || "guest";
  var room = params.get("room") || "lobby";
  var scheme = location.protocol === "https:" ? "wss://" : "ws://";
  var url = scheme + location.host + "/websocket?id=" + encodeURIComponent(id) +
    "&channel=" + encodeURIComponent(room) +                  // messages for the room
    "&channel=" + encodeURIComponent("presence-" + room);     // who is in it
  var client = null;

  function byId(name) { return document.getElementById(name); }

  function add(list, text) {
    var item = document.createElement("li");
    item.textContent = text;  // text, never HTML: what is pushed cannot run in the page
    list.appendChild(item);
  }

  byId("room").textContent = room;
  client = WSBoard.connect(url, {
    onStatus: function (state) {
      byId("status").textContent = state;
      byId("conn").textContent = (client && client.connectionId) || "";
    },
    onMessage: function (text) { add(byId("messages"), text); },
    onGap: function () { add(byId("messages"), "(some messages were lost while away)"); },
    onPresence: function (channel, members) {
      var list = byId("members");
      list.textContent = "";
      members.forEach(function (member) {
        var name = member.meta && member.meta.name ? " (" + member.meta.name + ")" : "";
        add(list, member.id + name);
      });
    }
  });
})();
