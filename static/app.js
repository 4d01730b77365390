// Tanglebox chat: the few things htmx does not do by itself.
//
// htmx and its ws extension carry the chat: forms go to /ws/chat as JSON, HTML fragments come
// back and are swapped in by id. This file adds: Enter to send, copy buttons, the connection
// state (connecting / connected / reconnecting / idle), reconnecting after an idle close,
// keeping a draft across a reconnect, focus and scrolling. No inline code: the CSP forbids it.
(function () {
  "use strict";

  var RECONNECTING_CODES = [1006, 1011, 1012, 1013]; // the codes htmx's ws extension retries
  var NEAR_BOTTOM_PX = 80;

  var app = document.querySelector("[ws-connect]");
  if (!app) return;
  var scroller = document.getElementById("chat-scroll");
  var connection = document.getElementById("connection-state");
  var hasConnected = false;
  var idleSocket = null; // the ws wrapper closed for idleness, reopened on the next use
  var followReply = true; // keep the newest text in view unless the reader scrolled up
  var refocusComposer = false; // put the caret back in the composer when it is enabled again
  var focusedId = null;

  function setConnection(state, label) {
    connection.dataset.state = state;
    connection.querySelector(".connection__label").textContent = label;
  }

  // -- connection state, from the ws extension's events ---------------------------------
  app.addEventListener("htmx:wsConnecting", function () {
    setConnection(hasConnected ? "reconnecting" : "connecting",
      hasConnected ? "Reconnecting…" : "Connecting…");
  });
  app.addEventListener("htmx:wsOpen", function () {
    hasConnected = true;
    idleSocket = null;
    setConnection("connected", "Connected");
  });
  app.addEventListener("htmx:wsClose", function (event) {
    var code = event.detail.event.code;
    if (RECONNECTING_CODES.indexOf(code) >= 0) {
      setConnection("reconnecting", "Reconnecting…");
    } else {
      // The server closed a quiet socket (or refused it): reconnect when the person is back.
      idleSocket = event.detail.socketWrapper;
      setConnection("idle", "Paused");
    }
  });
  function wakeUp() {
    if (idleSocket) {
      var socket = idleSocket;
      idleSocket = null;
      socket.reconnect();
    }
  }
  ["pointerdown", "keydown", "focusin"].forEach(function (name) {
    app.addEventListener(name, wakeUp, true);
  });

  // -- the composer: Enter sends, Shift+Enter is a new line -----------------------------
  app.addEventListener("keydown", function (event) {
    var field = event.target;
    if (field.name !== "userPrompt" || event.key !== "Enter") return;
    if (event.shiftKey || event.isComposing) return;
    event.preventDefault();
    if (!field.disabled && field.value.trim()) field.form.requestSubmit();
  });
  app.addEventListener("htmx:wsAfterSend", function (event) {
    if (event.target.closest("#composer")) {
      refocusComposer = true;
      followReply = true;
    }
  });

  // -- before and after each fragment: draft, focus, scroll ------------------------------
  app.addEventListener("htmx:wsBeforeMessage", function () {
    followReply = followReply || isNearBottom();
    var active = document.activeElement;
    focusedId = active && active !== document.body ? active.id : null;
  });
  document.body.addEventListener("htmx:oobBeforeSwap", function (event) {
    // On (re)connect the server sends an empty composer marked data-keep-draft: keep what
    // the person typed meanwhile.
    var incoming = event.detail.fragment.querySelector &&
      event.detail.fragment.querySelector("textarea[data-keep-draft]");
    var current = document.getElementById("prompt");
    if (incoming && current && current.value && !incoming.value) {
      incoming.value = current.value;
      incoming.textContent = current.value;
    }
  });
  app.addEventListener("htmx:wsAfterMessage", function () {
    var prompt = document.getElementById("prompt");
    if (refocusComposer && prompt && !prompt.disabled) {
      prompt.focus();
      refocusComposer = false;
    } else if (focusedId && document.activeElement === document.body) {
      var again = document.getElementById(focusedId);
      if (again && !again.disabled) again.focus();
      // The composer turned busy under the caret: Stop is the control that the keyboard
      // needs now (else the focus falls back to the top of the page).
      else if (again === prompt) focusStop();
    }
    if (followReply) scroller.scrollTop = scroller.scrollHeight;
  });
  function focusStop() {
    var stop = document.querySelector("#composer .round-button--stop");
    if (stop) stop.focus();
  }
  // An Enter held down (auto-repeat) sent the message; it must not stop the reply once the
  // focus has moved to Stop.
  app.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && event.repeat && event.target.closest(".round-button--stop")) {
      event.preventDefault();
    }
  });
  scroller.addEventListener("scroll", function () {
    followReply = isNearBottom();
  }, { passive: true });
  function isNearBottom() {
    return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < NEAR_BOTTOM_PX;
  }

  // -- copy buttons on code blocks (rendered by the server, inside hx-disable) -----------
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy-code]");
    if (!button) return;
    var code = button.closest(".code-block").querySelector("code");
    copyText(code.textContent).then(function () {
      button.textContent = "Copied";
      button.classList.add("is-done");
      setTimeout(function () {
        button.textContent = "Copy";
        button.classList.remove("is-done");
      }, 1500);
    });
  });
  // -- Copy under a reply: its stored Markdown source, read from the URL the button names -
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy-markdown]");
    if (!button) return;
    fetch(button.getAttribute("data-copy-markdown"), { credentials: "same-origin" })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(copyText).then(function () {
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = "Copy"; }, 1500);
    }, function () { button.textContent = "Copy failed"; });
  });
  // -- "Show prompt" under a reply: its inside is fetched when first opened (server HTML,
  //    the prompt escaped there) -----------------------------------------------------------
  document.addEventListener("toggle", function (event) {
    var details = event.target;
    if (!details.matches || !details.matches("details[data-prompt-url]") || !details.open) return;
    var url = details.getAttribute("data-prompt-url");
    details.removeAttribute("data-prompt-url");
    fetch(url, { credentials: "same-origin" }).then(function (response) {
      if (!response.ok) throw new Error("HTTP " + response.status);
      return response.text();
    }).then(function (html) {
      details.querySelector(".reply-prompt__body").innerHTML = html;
    }, function () {
      details.setAttribute("data-prompt-url", url);
    });
  }, true);
  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text);
    }
    // Plain http on a LAN address is not a secure context: fall back to a hidden selection.
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "visually-hidden";
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
    return Promise.resolve();
  }

  // -- the settings popover closes on Escape and on a click outside it -------------------
  var settings = document.querySelector("details.settings");
  if (settings) {
    document.addEventListener("click", function (event) {
      if (settings.open && !settings.contains(event.target)) settings.open = false;
    });
    document.addEventListener("keydown", function (event) {
      if (event.key === "Escape" && settings.open) {
        settings.open = false;
        settings.querySelector("summary").focus();
      }
    });
  }
})();

// The page's history (history.py): the sidebar, a drawer on a phone. This adds: opening and
// closing the drawer, the page's URL following its conversation (/c/<id> once it is stored,
// "/" after New chat: data-conversation-url in #messages), the list refreshed when a
// reply ends or the conversation changes, and the import form sent once a file is chosen.
(function () {
  "use strict";

  var sidebar = document.getElementById("sidebar");
  if (!sidebar) return;
  var search = document.getElementById("history-search");
  var opener = document.querySelector("[data-drawer-open]");

  // -- the drawer ------------------------------------------------------------------------
  function setDrawer(open) {
    document.body.classList.toggle("drawer-is-open", open);
    if (opener) opener.setAttribute("aria-expanded", open ? "true" : "false");
    if (open) search.focus();
    else if (opener && sidebar.contains(document.activeElement)) opener.focus();
  }
  document.addEventListener("click", function (event) {
    if (event.target.closest("[data-drawer-open]")) setDrawer(true);
    else if (event.target.closest("[data-drawer-close]")) setDrawer(false);
    // A menu of the list closes on a click outside it.
    sidebar.querySelectorAll(".history__menu[open]").forEach(function (menu) {
      if (!menu.contains(event.target)) menu.open = false;
    });
  });
  document.addEventListener("keydown", function (event) {
    if (event.key !== "Escape") return;
    var menu = sidebar.querySelector(".history__menu[open]");
    if (menu) {
      menu.open = false;
      menu.querySelector("summary").focus();
    } else if (document.body.classList.contains("drawer-is-open")) {
      setDrawer(false);
    }
  });

  // -- import: the file chooser sends its form ------------------------------------------
  sidebar.addEventListener("change", function (event) {
    if (event.target.matches("[data-submit-on-change]") && event.target.files.length) {
      event.target.form.submit();
    }
  });

  // -- the URL follows the conversation; the list follows the replies --------------------
  function refreshHistory() {
    if (!window.htmx) return;
    htmx.ajax("GET", "/history?q=" + encodeURIComponent(search.value),
      { target: "#history-list", swap: "outerHTML" });
  }
  var app = document.querySelector("[ws-connect]");
  if (!app) return;
  var wasBusy = false;
  app.addEventListener("htmx:wsAfterMessage", function () {
    // #messages carries it on connect and New chat; a new conversation's first turn, once
    // stored, carries it too (the latest in document order wins).
    var marks = document.querySelectorAll(
      "#messages[data-conversation-url], #messages [data-conversation-url]");
    var composer = document.getElementById("composer");
    var busy = !!composer && composer.classList.contains("is-busy");
    var changed = false;
    if (marks.length) {
      var url = marks[marks.length - 1].getAttribute("data-conversation-url") || "/";
      if (url !== window.location.pathname) {
        window.history.replaceState(null, "", url);
        changed = true;
      }
    }
    if (changed || (wasBusy && !busy)) refreshHistory();
    wasBusy = busy;
  });
})();
