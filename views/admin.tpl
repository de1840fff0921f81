<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>wsboard admin</title>
  <link rel="stylesheet" href="/static/wsboard.css">
</head>
<body class="admin">
  % stats, clients, channels = state["stats"], state["clients"], state["channels"]
  <header>
    <h1>wsboard admin</h1>
    <dl id="stats">
      <div><dt>Sockets</dt><dd id="stat_sockets">{{stats["sockets"]}}</dd></div>
      <div><dt>Client ids</dt><dd id="stat_ids">{{stats["ids"]}}</dd></div>
      <div><dt>Channels</dt><dd id="stat_channels">{{stats["channels"]}}</dd></div>
      <div><dt>Control connections</dt><dd id="stat_control">{{stats["control_connections"]}}</dd></div>
      <div><dt>Watchers</dt><dd id="stat_watchers">{{stats["watchers"]}}</dd></div>
      <div><dt>Delivered</dt><dd id="stat_delivered">{{stats["delivered"]}}</dd></div>
      <div><dt>Refused</dt><dd id="stat_refused">{{stats["refused"]}}</dd></div>
      <div><dt>Webhook drops</dt><dd id="stat_webhook_dropped">{{stats["webhook_dropped"]}}</dd></div>
      <div><dt>Backplane</dt><dd id="stat_backplane">{{stats["backplane"]}}</dd></div>
    </dl>
    <p id="live" role="status">not live: reload to see changes</p>
  </header>
  <main>
    <section>
      <h2>Clients</h2>
      <div class="toolbar">
        <label for="filter">Filter</label>
        <input id="filter" type="search" maxlength="200" autocomplete="off"
               placeholder="id, connection, address, origin, protocol, user">
        <button id="prev" type="button">&lsaquo; Previous</button>
        <span id="page_info">{{min(clients["matched"], 1)}}–{{len(clients["rows"])}} of {{clients["matched"]}}</span>
        <button id="next" type="button">Next &rsaquo;</button>
      </div>
      <div class="scroll">
        <table id="client_table">
          <thead><tr><th>Client id</th><th>Host</th><th>Connection</th><th>Since</th><th>Origin</th><th>Protocol</th><th>User</th><th>Queued</th><th>Metadata</th><th>Actions</th></tr></thead>
          <tbody>
          % for c in clients["rows"]:
            <tr data-conn="{{c['conn']}}" data-id="{{c['id']}}"><td>{{c['id']}}</td><td>{{c['peer']}}</td><td>{{c['conn']}}</td><td class="since" data-since="{{c['since']}}"></td><td>{{c['origin']}}</td><td>{{c['protocol']}}</td><td>{{c['user'] or ""}}</td><td>{{c['queued']}}</td><td class="meta">{{meta_text(c['meta'])}}</td><td><button class="target" type="button">Send here</button> <button class="kick" type="button">Kick</button></td></tr>
          % end
          </tbody>
        </table>
      </div>
      <p id="no_clients" {{!"" if not clients["rows"] else 'hidden'}}>No client is connected.</p>
    </section>
    <section class="forms">
      <form id="send_form">
        <h2>Send</h2>
        <label for="clients">Send to</label>
        <select id="clients" name="clientId" required>
        % for client_id in dict.fromkeys(c["id"] for c in clients["rows"]):
          <option value="{{client_id}}">{{client_id}}</option>
        % end
        </select>
        <label for="conn">Only this connection (optional)</label>
        <input id="conn" name="conn" autocomplete="off" pattern="[0-9]{1,20}\.[0-9]{1,20}"
               placeholder="connection id">
        <label for="message">Message</label>
        <textarea id="message" name="message" rows="3"></textarea>
        <p><button id="send_message" type="submit">Send Message</button></p>
        <p id="result" role="status"></p>
      </form>
      <form id="publish_form">
        <h2>Publish</h2>
        <label for="channel">Publish to channel</label>
        <input id="channel" name="channel" required maxlength="164" pattern="[A-Za-z0-9_\-=@,.;]+"
               list="channel_names" autocomplete="off">
        <datalist id="channel_names">
        % for channel in channels:
          <option value="{{channel['name']}}">
        % end
        </datalist>
        <label for="publish_message">Message</label>
        <textarea id="publish_message" name="message" rows="3"></textarea>
        <p><button id="publish_button" type="submit">Publish</button></p>
        <p id="publish_result" role="status"></p>
      </form>
      <form id="broadcast_form">
        <h2>Broadcast</h2>
        <label for="broadcast_message">Message to every socket</label>
        <textarea id="broadcast_message" name="message" rows="3"></textarea>
        <p><button id="broadcast_button" type="submit">Broadcast</button></p>
        <p id="broadcast_result" role="status"></p>
      </form>
    </section>
    <section>
      <h2>Channels</h2>
      <div class="scroll">
        <table id="channel_table" {{!"" if channels else 'hidden'}}>
          <thead><tr><th>Channel</th><th>Sockets</th><th>Members</th></tr></thead>
          <tbody>
          % for channel in channels:
            <tr><td>{{channel["name"]}}</td><td>{{channel["sockets"]}}</td><td>{{", ".join(channel["members"]) if channel["members"] is not None else ""}}</td></tr>
          % end
          </tbody>
        </table>
      </div>
      <p id="no_channels" {{!"" if not channels else 'hidden'}}>No socket is in a channel.</p>
    </section>
    <section id="refusals_section" {{!"" if state["refusals"] else 'hidden'}}>
      <h2>Refused since start</h2>
      <table id="refusals">
        <thead><tr><th>Kind</th><th>Count</th></tr></thead>
        <tbody>
        % for kind, count in state["refusals"].items():
          <tr><td>{{kind}}</td><td>{{count}}</td></tr>
        % end
        </tbody>
      </table>
    </section>
  </main>
  <script src="/static/admin.js"></script>
</body>
</html>
