// The admin page: posts {"clientId", "message"} as JSON to /sendMessage, and
// {"channel", "message"} to /publish, and shows each answer.
(function () {
  "use strict";

  function post(path, body, result, done) {
    result.textContent = "sending…";
    // location.origin, not a relative URL: a page opened as http://user:pass@host/admin
    // would lend its credentials to a relative URL, and fetch refuses those.
    fetch(location.origin + path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)})
      .then(function (response) { return response.json(); })
      .then(function (data) {
        result.textContent = data.error ? "Error: " + data.message : done(data);
      })
      .catch(function (error) {
        result.textContent = "Error: " + error;
      });
  }

  document.getElementById("send_form").addEventListener("submit", function (event) {
    event.preventDefault();
    post("/sendMessage", {
      clientId: document.getElementById("clients").value,
      message: document.getElementById("message").value
    }, document.getElementById("result"), function () { return "Message sent"; });
  });

  document.getElementById("publish_form").addEventListener("submit", function (event) {
    event.preventDefault();
    post("/publish", {
      channel: document.getElementById("channel").value,
      message: document.getElementById("publish_message").value
    }, document.getElementById("publish_result"), function (data) {
      return "Published to " + data.message + " socket(s)";
    });
  });
})();
