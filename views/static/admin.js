// The admin page. It keeps itself up to date: /admin/events (Server-Sent Events) says when
// sockets came, went, joined or left, and the page then asks /admin/state.json for what it
// shows, one page of clients at a time, filtered by the server (so 10,000 clients cost one
// page). The forms post JSON: {"clientId", "message"} to /sendMessage, {"conn", "message"}
// to /admin/send, {"channel", "message"} to /publish, {"message"} to /admin/broadcast, and
// {"conn"} to /admin/kick. Everything shown is set as text, never as HTML.
(function () {
  "use strict";

  var view = {q: "", offset: 0, limit: 100, matched: 0};
  var shown = {};  // what each part shows now, as JSON: an unchanged part is left alone
  var loading = false;
  var again = false;

  function $(id) { return document.getElementById(id); }

  // location.origin, not a relative URL: a page opened as http://user:pass@host/admin
  // would lend its credentials to a relative URL, and fetch refuses those.
  function url(path) { return location.origin + path; }

  function post(path, body, result, done) {
    result.textContent = "sending…";
    fetch(url(path), {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)})
      .then(function (response) { return response.json(); })
      .then(function (data) {
        result.textContent = data.error ? "Error: " + data.message : done(data);
        refresh();
      })
      .catch(function (error) {
        result.textContent = "Error: " + error;
      });
  }

  function since(seconds) {
    var age = Math.max(0, Date.now() / 1000 - seconds);
    if (age < 60) { return Math.round(age) + " s"; }
    if (age < 3600) { return Math.round(age / 60) + " min"; }
    if (age < 86400) { return (age / 3600).toFixed(1) + " h"; }
    return (age / 86400).toFixed(1) + " d";
  }

  function cell(row, text, className) {
    var td = document.createElement("td");
    td.textContent = text;
    if (className) { td.className = className; }
    row.appendChild(td);
    return td;
  }

  function button(parent, text, className) {
    var b = document.createElement("button");
    b.type = "button";
    b.className = className;
    b.textContent = text;
    parent.appendChild(b);
    parent.appendChild(document.createTextNode(" "));
  }

  function showSince() {
    var cells = document.querySelectorAll("#client_table td.since");
    for (var i = 0; i < cells.length; i++) {
      var at = Number(cells[i].getAttribute("data-since"));
      cells[i].textContent = since(at);
      cells[i].title = new Date(at * 1000).toISOString();
    }
  }

  // Redraw a part only when what it shows changed, so rows do not vanish under the pointer.
  function changed(part, value) {
    var text = JSON.stringify(value);
    if (shown[part] === text) { return false; }
    shown[part] = text;
    return true;
  }

  function showClients(clients) {
    if (!changed("clients", clients)) { return; }
    var body = $("client_table").tBodies[0];
    var rows = document.createDocumentFragment();
    clients.rows.forEach(function (c) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-conn", c.conn);
      tr.setAttribute("data-id", c.id);
      cell(tr, c.id);
      cell(tr, c.peer);
      cell(tr, c.conn);
      cell(tr, "", "since").setAttribute("data-since", c.since);
      cell(tr, c.origin);
      cell(tr, c.protocol);
      cell(tr, c.user === null ? "" : c.user);
      cell(tr, String(c.queued));
      cell(tr, c.meta === null ? "" : JSON.stringify(c.meta), "meta");
      var actions = cell(tr, "");
      button(actions, "Send here", "target");
      button(actions, "Kick", "kick");
      rows.appendChild(tr);
    });
    body.replaceChildren(rows);
    showSince();
    view.matched = clients.matched;
    var first = clients.matched ? clients.offset + 1 : 0;
    $("page_info").textContent = first + "–" + (clients.offset + clients.rows.length) + " of " + clients.matched +
      (clients.matched !== clients.total ? " (" + clients.total + " in all)" : "");
    $("prev").disabled = clients.offset === 0;
    $("next").disabled = clients.offset + clients.rows.length >= clients.matched;
    $("no_clients").hidden = clients.total > 0;
    showIds(clients.rows);
  }

  // The send form's ids: those on this page; one that is selected stays, marked, when it goes,
  // so what the admin picked never changes under their hands.
  function showIds(rows) {
    var select = $("clients");
    var chosen = select.value;
    var ids = [];
    rows.forEach(function (c) { if (ids.indexOf(c.id) < 0) { ids.push(c.id); } });
    var options = document.createDocumentFragment();
    ids.forEach(function (id) {
      var option = document.createElement("option");
      option.value = id;
      option.textContent = id;
      options.appendChild(option);
    });
    if (chosen && ids.indexOf(chosen) < 0) {
      var gone = document.createElement("option");
      gone.value = chosen;
      gone.textContent = chosen + " (not on this page)";
      options.appendChild(gone);
    }
    select.replaceChildren(options);
    if (chosen) { select.value = chosen; }
  }

  function showChannels(channels) {
    if (!changed("channels", channels)) { return; }
    var rows = document.createDocumentFragment();
    var names = document.createDocumentFragment();
    channels.forEach(function (ch) {
      var tr = document.createElement("tr");
      cell(tr, ch.name);
      cell(tr, String(ch.sockets));
      cell(tr, ch.members === null ? "" : ch.members.join(", "));
      rows.appendChild(tr);
      var option = document.createElement("option");
      option.value = ch.name;
      names.appendChild(option);
    });
    $("channel_table").tBodies[0].replaceChildren(rows);
    $("channel_names").replaceChildren(names);
    $("no_channels").hidden = channels.length > 0;
    $("channel_table").hidden = channels.length === 0;
  }

  function showRefusals(refusals) {
    if (!changed("refusals", refusals)) { return; }
    var rows = document.createDocumentFragment();
    Object.keys(refusals).forEach(function (kind) {
      var tr = document.createElement("tr");
      cell(tr, kind);
      cell(tr, String(refusals[kind]));
      rows.appendChild(tr);
    });
    $("refusals").tBodies[0].replaceChildren(rows);
    $("refusals_section").hidden = Object.keys(refusals).length === 0;
  }

  function showStats(stats) {
    $("stat_sockets").textContent = stats.sockets;
    $("stat_ids").textContent = stats.ids;
    $("stat_channels").textContent = stats.channels;
    $("stat_control").textContent = stats.control_connections;
    $("stat_watchers").textContent = stats.watchers;
    $("stat_delivered").textContent = stats.delivered;
    $("stat_refused").textContent = stats.refused;
    $("stat_webhook_dropped").textContent = stats.webhook_dropped;
    $("stat_backplane").textContent = stats.backplane;
  }

  // One request at a time; a change that comes meanwhile asks again when it is answered.
  function refresh() {
    if (loading) { again = true; return; }
    loading = true;
    var query = "?q=" + encodeURIComponent(view.q) + "&offset=" + view.offset + "&limit=" + view.limit;
    fetch(url("/admin/state.json" + query), {cache: "no-store"})
      .then(function (response) { return response.json(); })
      .then(function (state) {
        if (state.error) { $("live").textContent = "Error: " + state.error; return; }
        showStats(state.stats);
        showClients(state.clients);
        showChannels(state.channels);
        showRefusals(state.refusals);
      })
      .catch(function (error) { $("live").textContent = "Error: " + error; })
      .then(function () {
        loading = false;
        if (again) { again = false; refresh(); }
      });
  }

  function listen() {
    if (!window.EventSource) { return; }
    var events = new EventSource(url("/admin/events"));
    events.addEventListener("open", function () { $("live").textContent = "live"; refresh(); });
    events.addEventListener("change", refresh);
    events.addEventListener("error", function () { $("live").textContent = "reconnecting…"; });
  }

  var typing = 0;
  $("filter").addEventListener("input", function () {
    clearTimeout(typing);
    typing = setTimeout(function () {
      view.q = $("filter").value;
      view.offset = 0;
      refresh();
    }, 200);
  });
  $("prev").addEventListener("click", function () {
    view.offset = Math.max(0, view.offset - view.limit);
    refresh();
  });
  $("next").addEventListener("click", function () {
    if (view.offset + view.limit < view.matched) { view.offset += view.limit; refresh(); }
  });

  $("client_table").addEventListener("click", function (event) {
    var target = event.target;
    var row = target.closest("tr");
    if (!row || target.tagName !== "BUTTON") { return; }
    var conn = row.getAttribute("data-conn");
    if (target.classList.contains("kick")) {
      post("/admin/kick", {conn: conn}, $("result"), function () { return "Kicked " + conn; });
    } else if (target.classList.contains("target")) {
      $("clients").value = row.getAttribute("data-id");
      $("conn").value = conn;
      $("message").focus();
    }
  });

  $("send_form").addEventListener("submit", function (event) {
    event.preventDefault();
    var conn = $("conn").value.trim();
    var message = $("message").value;
    if (conn) {
      post("/admin/send", {conn: conn, message: message}, $("result"), function () { return "Message sent"; });
    } else {
      post("/sendMessage", {clientId: $("clients").value, message: message}, $("result"),
        function () { return "Message sent"; });
    }
  });

  $("publish_form").addEventListener("submit", function (event) {
    event.preventDefault();
    post("/publish", {
      channel: $("channel").value,
      message: $("publish_message").value
    }, $("publish_result"), function (data) {
      return "Published to " + data.message + " socket(s)";
    });
  });

  $("broadcast_form").addEventListener("submit", function (event) {
    event.preventDefault();
    post("/admin/broadcast", {message: $("broadcast_message").value}, $("broadcast_result"),
      function (data) { return "Broadcast to " + data.message + " socket(s)"; });
  });

  showSince();
  setInterval(showSince, 10000);
  setInterval(function () { if (!document.hidden) { refresh(); } }, 5000);  // the counters
  listen();
})();
