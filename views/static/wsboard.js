// wsboard.js: a small browser client for wsboard, with no build step.
//
//   var client = WSBoard.connect("wss://push.example.com/websocket?id=ID", {
//     onMessage: function (text, seq, offsets) { … },  // each message, once, in order
//     onGap: function (gap) { … },               // something was lost: reload what you show
//     onStatus: function (state, code) { … },    // "connecting" | "connected" | "reconnecting" | "closed"
//     onPresence: function (channel, members, change) { … }  // a presence- channel's members
//   });
//   client.connectionId;      // this socket's connection id, once connected ("123.45")
//   client.members(channel);  // [{id, meta}, …] of a presence- channel the socket is in
//   client.channelPosition(channel);  // {epoch, offset} of a channel's history it has seen
//   client.transport;         // "websocket" or "events"
//   client.close();
//
// Tokens run out: a socket whose token has an exp (the hello says it) is closed at it with
// 4001, unless it is refreshed first. Give {refresh: function (done) { … done({exp, token})
// }} (or return a Promise of {exp, token}): the page asks its server (PHP mints a new token
// for the same id and channels), and wsboard.js hands it over at a random point of the
// token's last fifth, so pages loaded together do not all refresh together. When a refresh
// could not be made in time, it reconnects with a fresh token and resumes. Without refresh,
// a 4001 ends it, unless the URL carries no token (the connect hook decides each time).
//
// Where a WebSocket cannot be opened (a proxy or middlebox that drops upgrades), it falls
// back to the event stream (/events, Server-Sent Events) with the same URL's query and the
// same callbacks: after two WebSocket attempts in a row that never opened, on a page whose
// WebSocket never opened at all. {transport: "events"} starts there; {transport:
// "websocket"} never leaves it. The stream resumes by itself (Last-Event-ID).
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
//
// Channels resume too when the server keeps their history (--history): publications carry
// their offset in each channel ({"news": 41}, the third argument of onMessage), and a
// reconnect asks for what came after the last offset seen of each channel (since=), so a
// publication is shown once even when it was sent while the page was away. A channel whose
// missed publications are gone gets onGap({channel, after}). A page rendered with a position
// (since=news:<epoch>:<offset> in the URL, from the server's {"op":"position"}) gets
// everything published after the render, even on its first connection.
(function (global) {
  "use strict";

  var NO_RECONNECT = {4000: true, 1008: true};
  var FALLBACK_AFTER = 2;  // WebSocket attempts that never opened, before the event stream

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
    var client = {connectionId: null, transport: "websocket"};
    var mode = handlers.transport || "auto";  // "auto" | "websocket" | "events"
    var everOpened = false;
    var unopened = 0;  // WebSocket attempts in a row that never opened
    var stream = null;
    var refreshTimer = null;
    var members = {};  // channel -> [{id, meta}]
    var channels = {};  // channel -> {epoch, offset}: the last publication seen there
    var query = url.indexOf("?");
    if (query >= 0) {  // the page's since= positions: tracked here, sent again on each connect
      var kept = url.slice(query + 1).split("&").filter(function (part) {
        if (part.indexOf("since=") !== 0) return true;
        var pieces = decodeURIComponent(part.slice(6)).split(":");  // <channel>:<epoch>:<offset>
        if (pieces.length === 3) channels[pieces[0]] = {epoch: pieces[1], offset: Number(pieces[2])};
        return false;
      });
      url = url.slice(0, query) + (kept.length ? "?" + kept.join("&") : "");
    }

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
      var params = [];
      if (epoch) params.push("epoch=" + encodeURIComponent(epoch), "last=" + last);
      Object.keys(channels).forEach(function (name) {
        var at = channels[name];
        if (at.epoch) params.push("since=" + encodeURIComponent(name + ":" + at.epoch + ":" + at.offset));
      });
      if (!params.length) return url;
      return url + (url.indexOf("?") < 0 ? "?" : "&") + params.join("&");
    }

    function onHello(positions) {
      Object.keys(positions || {}).forEach(function (name) {
        var now = positions[name];
        var seen = channels[name];
        if (!seen || !seen.epoch) {
          channels[name] = {epoch: now.epoch, offset: now.offset};  // from here on
        } else if (seen.epoch !== now.epoch) {
          channels[name] = {epoch: now.epoch, offset: 0};  // numbered afresh: a gap follows
        }
      });
    }

    function seenBefore(offsets) {
      // A publication is new when it is past the last offset seen in any of its channels.
      var fresh = false;
      Object.keys(offsets).forEach(function (name) {
        var seen = channels[name];
        if (!seen) {
          fresh = true;
        } else if (offsets[name] > seen.offset) {
          seen.offset = offsets[name];
          fresh = true;
        }
      });
      return !fresh;
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
        onHello(frame.hello.channels);
        scheduleRefresh(frame.hello.exp);
        call("onStatus", "connected");  // the hello comes first: now the socket is ready
      } else if (frame.refreshed) {
        scheduleRefresh(frame.refreshed.exp);
      } else if (frame.presence) {
        onPresence(frame.presence);
      } else if (frame.gap) {
        call("onGap", frame.gap);
      } else if ("data" in frame) {
        if (typeof frame.seq === "number") {
          if (frame.seq <= last) return;  // already seen
          last = frame.seq;
        }
        if (frame.offsets && seenBefore(frame.offsets)) return;  // already seen
        call("onMessage", frame.data, frame.seq, frame.offsets || null);
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

    function param(name, value) {  // url with name=value in place of the one it had
      var pattern = new RegExp("([?&])" + name + "=[^&]*");
      var pair = name + "=" + encodeURIComponent(value);
      url = pattern.test(url) ? url.replace(pattern, "$1" + pair) : url + (url.indexOf("?") < 0 ? "?" : "&") + pair;
    }

    function newToken(then) {  // ask the page for a token; then(fresh) or then(null)
      if (typeof handlers.refresh !== "function") return then(null);
      var answered = false;
      function done(fresh) {
        if (answered) return;
        answered = true;
        if (fresh && fresh.exp && fresh.token) {
          param("exp", fresh.exp);
          param("token", fresh.token);
          then(fresh);
        } else {
          then(null);
        }
      }
      try {
        var promise = handlers.refresh(done);
        if (promise && typeof promise.then === "function") {
          promise.then(done, function () { done(null); });
        }
      } catch (error) {
        if (global.console) global.console.error(error);
        done(null);
      }
    }

    function scheduleRefresh(exp) {
      global.clearTimeout(refreshTimer);
      if (!exp || typeof handlers.refresh !== "function") return;
      var left = exp * 1000 - Date.now();
      var at = Math.min(left * 0.8 + Math.random() * left * 0.2, left - 1000);
      refreshTimer = global.setTimeout(function () {
        newToken(function (fresh) {
          if (fresh && socket && socket.readyState === 1) {
            socket.send(JSON.stringify({refresh: {exp: fresh.exp, token: fresh.token}}));
          }
        });
      }, Math.max(0, at));
    }

    function expired(code) {  // 4001: a fresh token, then a resume; or the end
      if (typeof handlers.refresh === "function") {
        newToken(function (fresh) {
          if (fresh) retry(code);
          else call("onStatus", "closed", code);
        });
      } else if (!/[?&]token=/.test(url)) {
        retry(code);  // the connect hook decides again, on the page's cookies
      } else {
        call("onStatus", "closed", code);
      }
    }

    function retry(code) {
      var ceiling = Math.min(maxDelay, minDelay * Math.pow(2, attempt++));
      var delay = ceiling / 2 + Math.random() * ceiling / 2;  // jitter: spread the herd
      call("onStatus", "reconnecting", code);
      timer = global.setTimeout(open, delay);
    }

    function open() {
      if (mode === "events" || (mode === "auto" && !everOpened && unopened >= FALLBACK_AFTER)) {
        openStream();
        return;
      }
      call("onStatus", "connecting");
      var opened = false;
      socket = new WebSocket(resumeUrl(), ["wsboard.v1"]);
      socket.onopen = function () {
        attempt = 0;
        opened = everOpened = true;
        unopened = 0;
      };
      socket.onmessage = onFrame;
      socket.onclose = function (event) {
        socket = null;
        if (stopped || NO_RECONNECT[event.code]) {
          call("onStatus", "closed", event.code);
          return;
        }
        global.clearTimeout(refreshTimer);
        if (!opened) unopened++;
        if (event.code === 4001) return expired(event.code);
        retry(event.code);
      };
    }

    // The event stream: the same frames as named events, messages as unnamed ones, and
    // each position in the event's id (what Last-Event-ID sends back).
    function trackId(id) {
      if (!id) return;
      var parts = id.split("|");
      var inbox = parts[0].split(":");
      if (inbox.length === 2) {
        epoch = inbox[0];
        last = Number(inbox[1]);
      }
      parts.slice(1).forEach(function (part) {
        var at = part.split(":");
        if (at.length === 3) channels[at[0]] = {epoch: at[1], offset: Number(at[2])};
      });
    }

    function openStream() {
      call("onStatus", "connecting");
      client.transport = "events";
      var streamUrl = resumeUrl().replace(/^ws/, "http").replace(/\/websocket(\?|$)/, "/events$1");
      stream = new global.EventSource(streamUrl, {withCredentials: true});
      stream.addEventListener("hello", function (event) {
        var hello = JSON.parse(event.data);
        if ((hello.epoch || "") !== epoch) last = 0;
        epoch = hello.epoch || "";
        client.connectionId = hello.conn || null;
        onHello(hello.channels);
        attempt = 0;
        call("onStatus", "connected");
      });
      stream.onmessage = function (event) {
        trackId(event.lastEventId);
        call("onMessage", event.data, null, null);
      };
      stream.addEventListener("presence", function (event) {
        onPresence(JSON.parse(event.data));
      });
      stream.addEventListener("gap", function (event) {
        call("onGap", JSON.parse(event.data));
      });
      stream.addEventListener("expired", function (event) {
        stream.close();
        stream = null;
        expired(JSON.parse(event.data).code);
      });
      stream.addEventListener("close", function (event) {
        var end = JSON.parse(event.data);
        if (NO_RECONNECT[end.code]) {
          stream.close();
          stream = null;
          call("onStatus", "closed", end.code);
        } else {
          call("onStatus", "reconnecting", end.code);  // EventSource comes back by itself
        }
      });
      stream.onerror = function () {
        if (stopped || !stream) return;
        trackId(stream.lastEventId);
        if (stream.readyState === global.EventSource.CLOSED) {  // refused: try again later
          stream = null;
          retry();
        } else {
          call("onStatus", "reconnecting");
        }
      };
    }

    open();
    client.close = function () {
      stopped = true;
      global.clearTimeout(timer);
      global.clearTimeout(refreshTimer);
      if (socket) socket.close(1000);
      if (stream) stream.close();
    };
    client.position = function () {
      return {epoch: epoch, seq: last};
    };
    client.channelPosition = function (channel) {
      var at = channels[channel];
      return at ? {epoch: at.epoch, offset: at.offset} : null;
    };
    client.members = function (channel) {
      return (members[channel] || []).slice();
    };
    return client;
  }

  global.WSBoard = {connect: connect};
})(window);
