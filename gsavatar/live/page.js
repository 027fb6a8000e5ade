// The microphone client of the `gsavatar live` page: the browser's microphone to the live
// WebSocket (s16le at the AudioContext's rate), the frames that come back drawn over the page
// with their audio played in step. The page inlines this file into the button's onclick (viser
// runs inline handlers, not <script> elements); __WS_PORT__ is the live server's port.
(function (button) {
  var state = window.gsavatarLive;
  if (state && state.running) { state.stop(); return; }
  state = window.gsavatarLive = { running: true, framesShown: 0, framesReceived: 0, sent: 0, errors: [] };
  var status = document.getElementById("gsavatar-live-status");
  function say(text) { if (status) status.textContent = text; }
  var ctx = new (window.AudioContext || window.webkitAudioContext)();
  var ws = new WebSocket("ws://" + location.hostname + ":__WS_PORT__");
  ws.binaryType = "arraybuffer";
  var canvas = document.createElement("canvas");
  canvas.id = "gsavatar-live-canvas";
  canvas.style.cssText = "position:fixed;left:0;top:0;z-index:5;background:#000;height:100vh;max-width:100vw;";
  document.body.appendChild(canvas);
  var g = canvas.getContext("2d");
  var playhead = 0, queue = [], source = null, processor = null, stream = null;
  button.textContent = "Stop microphone";
  say("asking for the microphone...");
  state.stop = function () {
    state.running = false;
    try { ws.send(JSON.stringify({ type: "end" })); } catch (e) {}
    if (processor) processor.disconnect();
    if (source) source.disconnect();
    if (stream) stream.getTracks().forEach(function (t) { t.stop(); });
    button.textContent = "Start microphone";
    say("stopped");
  };
  ws.onopen = function () {
    navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } }).then(function (s) {
      stream = s;
      ws.send(JSON.stringify({ type: "start", sample_rate: Math.round(ctx.sampleRate), format: "s16le" }));
      source = ctx.createMediaStreamSource(s);
      processor = ctx.createScriptProcessor(1024, 1, 1);
      processor.onaudioprocess = function (e) {
        if (!state.running || ws.readyState !== 1) return;
        var x = e.inputBuffer.getChannelData(0), pcm = new Int16Array(x.length);
        for (var i = 0; i < x.length; i++) pcm[i] = Math.max(-1, Math.min(1, x[i])) * 32767;
        ws.send(pcm.buffer);
        state.sent += x.length;
      };
      source.connect(processor);
      processor.connect(ctx.destination);  // a ScriptProcessor runs only while connected (it outputs silence)
      say("listening: speak");
    }).catch(function (e) { state.errors.push(String(e)); say("no microphone: " + e.message); ws.close(); });
  };
  ws.onmessage = function (ev) {
    if (typeof ev.data === "string") {
      var msg = JSON.parse(ev.data);
      if (msg.type === "error") { state.errors.push(msg.message); say("server: " + msg.message); }
      return;
    }
    var v = new DataView(ev.data);
    var flags = v.getUint8(5), nAudio = v.getUint32(32, true), nImage = v.getUint32(36, true);
    var pcm = new Int16Array(ev.data.slice(40, 40 + nAudio));
    var buffer = ctx.createBuffer(1, pcm.length, 16000), ch = buffer.getChannelData(0);
    for (var i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
    playhead = Math.max(playhead, ctx.currentTime + 0.05);  // a little cushion after a gap
    var node = ctx.createBufferSource();
    node.buffer = buffer;
    node.connect(ctx.destination);
    node.start(playhead);
    var at = playhead;
    playhead += buffer.duration;
    state.framesReceived += 1;
    if (flags & 1) {
      createImageBitmap(new Blob([ev.data.slice(40 + nAudio, 40 + nAudio + nImage)], { type: "image/jpeg" }))
        .then(function (bitmap) { queue.push({ at: at, bitmap: bitmap }); });
    }
  };
  ws.onclose = function () { if (state.running) { state.running = false; say("disconnected"); } };
  (function draw() {
    var now = ctx.currentTime, shown = null;
    while (queue.length && queue[0].at <= now) {
      if (shown) shown.bitmap.close();
      shown = queue.shift();
    }
    if (shown) {
      if (canvas.width !== shown.bitmap.width) { canvas.width = shown.bitmap.width; canvas.height = shown.bitmap.height; }
      g.drawImage(shown.bitmap, 0, 0);
      shown.bitmap.close();
      state.framesShown += 1;
    }
    if (state.running || queue.length) requestAnimationFrame(draw);
  })();
})(this);
