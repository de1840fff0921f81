// wsboard.js: a small browser client for wsboard, with no build step.
//
//   var client = WSBoard.connect("wss://push.example.com/websocket?id=ID", {
//     onMessage: function (text, seq) { … },     // each message, once, in order
//     onGap: function (gap) { … },               // something was lost: reload what you show
//     onStatus: function (state, code) { … }     // "connecting" | "connected" | "reconnecting" | "closed"
//   });
//   client.close();
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

    function call(name, a, b) {
      if (typeof handlers[name] === "function") {
        try {
          handlers[name](a, b);
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

    function open() {
      call("onStatus", "connecting");
      socket = new WebSocket(resumeUrl(), ["wsboard.v1"]);
      socket.onopen = function () {
        attempt = 0;
        call("onStatus", "connected");
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
    return {
      close: function () {
        stopped = true;
        global.clearTimeout(timer);
        if (socket) socket.close(1000);
      },
      position: function () {
        return {epoch: epoch, seq: last};
      }
    };
  }

  global.WSBoard = {connect: connect};
})(window);
