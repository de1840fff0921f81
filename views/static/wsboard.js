// wsboard.js: a small browser client for wsboard, with no build step.
//
//   var client = WSBoard.connect("wss://push.example.com/websocket?id=ID", {
//     onMessage: function (text, seq) { … },     // each message, once, in order
//     onGap: function (gap) { … },               // something was lost: reload what you show
//     onStatus: function (state, code) { … },    // "connecting" | "connected" | "reconnecting" | "closed"
//     onPresence: function (channel, members, change) { … }  // a presence- channel's members
//   });
//   client.connectionId;      // this socket's connection id, once connected ("123.45")
//   client.members(channel);  // [{id, meta}, …] of a presence- channel the socket is in
//   client.close();
//
// Channels are named in the URL (…/websocket?id=ID&channel=news&channel=presence-room). In a
// presence- channel the members are ids, not sockets: five tabs of one user are one member,
// and a reload within the server's grace is no leave. `change` is {join: {id, meta}},
// {leave: {id}}, or null for the whole list the socket gets when it joins.
//
// It speaks the wsboard.v1 subprotocol: every frame is JSON, and messages carry a per-id
// sequence number when the server keeps an inbox (--inbox). After a drop it reconnects with
// exponential backoff and jitter, and resumes from the last sequence number it saw. A page
// that is back within the inbox window misses nothing and sees nothing twice; when what it
// missed is gone, onGap says so. It does not reconnect after close 4000 (kicked) or 1008
// (policy).
(function (global) {
  "use strict";

  var NO_RECONNECT = {4000: true, 1008: true};

  function connect(url, handlers) {
    handlers = handlers || {};
    var minDelay = handlers.minDelay || 500;
    var maxDelay = handlers.maxDelay || 30000;
    var epoch = "";
    var last = 0;
    var attempt = 0;
    var socket = null;
    var timer = null;
    var stopped = false;
    var client = {connectionId: null};
    var members = {};  // channel -> [{id, meta}]

    function call(name, a, b, c) {
      if (typeof handlers[name] === "function") {
        try {
          handlers[name](a, b, c);
        } catch (error) {
          if (global.console) global.console.error(error);
        }
      }
    }

    function resumeUrl() {
      if (!epoch) return url;
      return url + (url.indexOf("?") < 0 ? "?" : "&") +
        "epoch=" + encodeURIComponent(epoch) + "&last=" + last;
    }

    function onFrame(event) {
      var frame;
      try {
        frame = JSON.parse(event.data);
      } catch (error) {
        return;
      }
      if (frame.hello) {
        if ((frame.hello.epoch || "") !== epoch) last = 0;  // numbered afresh
        epoch = frame.hello.epoch || "";
        client.connectionId = frame.hello.conn || null;
        call("onStatus", "connected");  // the hello comes first: now the socket is ready
      } else if (frame.presence) {
        onPresence(frame.presence);
      } else if (frame.gap) {
        call("onGap", frame.gap);
      } else if ("data" in frame) {
        if (typeof frame.seq === "number") {
          if (frame.seq <= last) return;  // already seen
          last = frame.seq;
        }
        call("onMessage", frame.data, frame.seq);
      }
    }

    function onPresence(p) {
      var list = members[p.channel] || [];
      var change = null;
      if (p.members) {
        list = p.members.slice();
      } else if (p.join) {
        list = list.filter(function (m) { return m.id !== p.join.id; }).concat([p.join]);
        change = {join: p.join};
      } else if (p.leave) {
        list = list.filter(function (m) { return m.id !== p.leave.id; });
        change = {leave: p.leave};
      }
      members[p.channel] = list;
      call("onPresence", p.channel, list.slice(), change);
    }

    function open() {
      call("onStatus", "connecting");
      socket = new WebSocket(resumeUrl(), ["wsboard.v1"]);
      socket.onopen = function () {
        attempt = 0;
      };
      socket.onmessage = onFrame;
      socket.onclose = function (event) {
        socket = null;
        if (stopped || NO_RECONNECT[event.code]) {
          call("onStatus", "closed", event.code);
          return;
        }
        var ceiling = Math.min(maxDelay, minDelay * Math.pow(2, attempt++));
        var delay = ceiling / 2 + Math.random() * ceiling / 2;  // jitter: spread the herd
        call("onStatus", "reconnecting", event.code);
        timer = global.setTimeout(open, delay);
      };
    }

    open();
    client.close = function () {
      stopped = true;
      global.clearTimeout(timer);
      if (socket) socket.close(1000);
    };
    client.position = function () {
      return {epoch: epoch, seq: last};
    };
    client.members = function (channel) {
      return (members[channel] || []).slice();
    };
    return client;
  }

  global.WSBoard = {connect: connect};
})(window);
