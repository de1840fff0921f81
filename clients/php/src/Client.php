<?php

declare(strict_types=1);

namespace Wsboard;

use Wsboard\Exception\BackplaneUnavailableException;
use Wsboard\Exception\ClientNotFoundException;
use Wsboard\Exception\CommandException;
use Wsboard\Exception\PermissionDeniedException;
use Wsboard\Exception\TimeoutException;
use Wsboard\Exception\UnreachableException;
use Wsboard\Exception\WsboardException;

/**
 * One connection to wsboard's control socket, opened on first use and reused across calls.
 *
 * A call (its connect, write and reads) takes at most the timeout in all, waiting in
 * stream_select (no busy loop); if the server restarted since the last
 * call, the next call reconnects once. "Not connected" is a result (false, 0, []), except for
 * the methods that promise delivery (sendToConnection, kickConnection), which throw
 * ClientNotFoundException; everything else that fails throws a WsboardException subclass.
 */
final class Client
{
    private const CLIENT_ID = '/\A[A-Za-z0-9_.:-]{1,128}\z/';
    private const PRIVATE_PREFIXES = ['private-', 'presence-'];

    /** A day: a longer wait is a mistake (INF or NAN would never end). */
    public const MAX_TIMEOUT = 86400.0;

    private string $path;
    private float $timeout;
    private string $buffer = '';
    /** @var resource|null */
    private $stream = null;

    public function __construct(?string $path = null, float $timeout = 5.0)
    {
        if (!is_finite($timeout) || $timeout <= 0 || $timeout > self::MAX_TIMEOUT) {
            throw new \InvalidArgumentException('timeout must be seconds above 0, ' . self::MAX_TIMEOUT . ' at most');
        }
        $this->path = $path ?? self::defaultPath();
        $this->timeout = $timeout;
    }

    public function __destruct()
    {
        $this->close();
    }

    /** $WSBOARD_CONTROL, else the first socket found where a server on its defaults puts it. */
    public static function defaultPath(): string
    {
        $setting = trim((string) getenv('WSBOARD_CONTROL'));
        if ($setting !== '' && $setting !== 'auto') {
            return $setting;
        }
        $candidates = ['/run/wsboard/wsboard.sock'];
        $runtime = (string) getenv('XDG_RUNTIME_DIR');
        if (str_starts_with($runtime, '/')) {
            $candidates[] = $runtime . '/wsboard.sock';
        }
        $candidates[] = '/tmp/wsboard-' . (function_exists('posix_getuid') ? posix_getuid() : getmyuid()) . '/wsboard.sock';
        foreach ($candidates as $candidate) {
            if (file_exists($candidate)) {
                return $candidate;
            }
        }
        return end($candidates);
    }

    public function close(): void
    {
        if ($this->stream !== null) {
            fclose($this->stream);
            $this->stream = null;
        }
        $this->buffer = '';
    }

    // The wire. A call has one deadline for all it does (connect, write, every read), so a
    // server that trickles its answer cannot stretch a call past its timeout.

    /** Seconds left until $deadline; TimeoutException once none are. */
    private function remaining(float $deadline): float
    {
        $left = $deadline - microtime(true);
        if ($left <= 0) {
            $this->close();  // an answer may still come: this connection is out of step
            throw new TimeoutException("no answer from {$this->path} within {$this->timeout} s");
        }
        return $left;
    }

    private function connect(float $deadline): void
    {
        $errno = 0;
        $errstr = '';
        $stream = @stream_socket_client('unix://' . $this->path, $errno, $errstr, $this->remaining($deadline));
        if ($stream === false) {
            if ($errno === 13 || stripos($errstr, 'permission') !== false) {
                throw new PermissionDeniedException("not allowed to use the control socket {$this->path}");
            }
            throw new UnreachableException("no wsboard at {$this->path}: $errstr");
        }
        stream_set_read_buffer($stream, 0);  // bytes wait in the kernel, where stream_select sees them
        $this->stream = $stream;
        $this->buffer = '';
    }

    /** The next answer line, by $deadline (null: wait for ever, as a watch does). */
    private function readLine(?float $deadline): string
    {
        while (($end = strpos($this->buffer, "\n")) === false) {
            $read = [$this->stream];
            $none = null;
            if ($deadline === null) {
                $ready = @stream_select($read, $none, $none, null);
            } else {
                $left = $this->remaining($deadline);
                $ready = @stream_select($read, $none, $none, (int) $left, (int) (($left - (int) $left) * 1e6));
            }
            if ($ready === 0) {
                $this->remaining($deadline ?? microtime(true));  // throws: the time is up
            }
            $chunk = $ready === false ? false : fread($this->stream, 65536);
            if ($chunk === false || $chunk === '') {
                $rest = $this->buffer;
                $this->close();  // out of step with its answers: start afresh next time
                if (str_starts_with($rest, 'ERROR ')) {
                    throw self::refusal(substr($rest, 6));
                }
                throw new UnreachableException("{$this->path} closed the connection");
            }
            $this->buffer .= $chunk;
        }
        $line = substr($this->buffer, 0, $end);
        $this->buffer = substr($this->buffer, $end + 1);
        return $line;
    }

    /**
     * Send lines in one write (pipelined) and read one answer line for each, all within
     * the timeout.
     *
     * @param string[] $commands
     * @return string[]
     */
    public function lines(array $commands): array
    {
        $data = '';
        foreach ($commands as $command) {
            if (strpbrk($command, "\r\n") !== false) {
                throw new \InvalidArgumentException('a command is one line: no CR or LF in it');
            }
            $data .= $command . "\n";
        }
        $deadline = microtime(true) + $this->timeout;
        if ($this->stream === null) {
            $this->connect($deadline);
        }
        if (!$this->write($data, $deadline)) {  // the server restarted since: once more, afresh
            $this->close();
            $this->connect($deadline);
            if (!$this->write($data, $deadline)) {
                try {
                    $said = $this->readLine($deadline);  // a server that refuses says why, then closes
                } catch (UnreachableException $e) {
                    throw new UnreachableException("cannot write to {$this->path}");
                }
                $this->close();
                if (!str_starts_with($said, 'ERROR ')) {
                    throw new UnreachableException("cannot write to {$this->path}");
                }
                throw self::refusal(substr($said, 6));
            }
        }
        $answers = [];
        foreach ($commands as $_) {
            $answers[] = $this->readLine($deadline);
        }
        return $answers;
    }

    private function write(string $data, float $deadline): bool
    {
        while ($data !== '') {
            $left = $this->remaining($deadline);
            stream_set_timeout($this->stream, (int) $left, (int) (($left - (int) $left) * 1e6));
            $written = @fwrite($this->stream, $data);
            if ($written === false || $written === 0) {
                if (stream_get_meta_data($this->stream)['timed_out']) {
                    $this->remaining(0.0);  // throws: the server took nothing in time
                }
                return false;
            }
            $data = substr($data, $written);
        }
        return true;
    }

    public function line(string $command): string
    {
        return $this->lines([$command])[0];
    }

    /** One JSON command; its answer, or the exception its error is. */
    public function request(string $op, array $fields = []): array
    {
        $line = $this->line(json_encode(['op' => $op] + $fields, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_THROW_ON_ERROR));
        if (str_starts_with($line, 'ERROR ')) {
            throw self::refusal(substr($line, 6));
        }
        $answer = json_decode($line, true, 512, JSON_THROW_ON_ERROR);
        if (empty($answer['ok']) && ($answer['error'] ?? '') !== 'Client Not Found') {
            throw self::refusal((string) ($answer['error'] ?? 'refused'));
        }
        return $answer;
    }

    private static function refusal(string $error): WsboardException
    {
        return match (true) {
            str_starts_with($error, 'Timeout') => new TimeoutException($error),
            str_starts_with($error, 'Backplane Unavailable') => new BackplaneUnavailableException($error),
            str_starts_with($error, 'Permission denied') => new PermissionDeniedException($error),
            default => new CommandException($error),
        };
    }

    private static function sent(string $answer): bool
    {
        if ($answer === 'OK') {
            return true;
        }
        if ($answer === 'ERROR Client Not Found') {
            return false;
        }
        throw self::refusal(str_starts_with($answer, 'ERROR ') ? substr($answer, 6) : $answer);
    }

    private static function clientId(string $id): string
    {
        if (!preg_match(self::CLIENT_ID, $id)) {
            throw new \InvalidArgumentException("not a client id (1-128 of A-Z a-z 0-9 _ - . :): $id");
        }
        return $id;
    }

    private static function oneLine(string $text): string
    {
        if (strpbrk($text, "\r\n") !== false) {
            throw new \InvalidArgumentException('SEND MESSAGE takes one line; use sendMany() for text with newlines');
        }
        return $text;
    }

    /** @return array{id?: string, conn?: string} */
    private static function target(?string $id, ?string $conn): array
    {
        if (($id === null) === ($conn === null)) {
            throw new \InvalidArgumentException('give a client id or a connection id, not both');
        }
        return $conn === null ? ['id' => $id] : ['conn' => $conn];
    }

    // Sending.

    /** Send text to every socket of $id: true when one took it, false when none is connected. */
    public function send(string $id, string $text): bool
    {
        return self::sent($this->line('SEND MESSAGE ' . self::clientId($id) . ' ' . self::oneLine($text)));
    }

    /**
     * Many sends in one write: [[id, text], ...] -> [bool, ...] in order.
     *
     * @param array<array{0: string, 1: string}> $messages
     * @return bool[]
     */
    public function sendLines(array $messages): array
    {
        $commands = array_map(
            static fn (array $m): string => 'SEND MESSAGE ' . self::clientId($m[0]) . ' ' . self::oneLine($m[1]),
            $messages
        );
        return array_map([self::class, 'sent'], $this->lines($commands));
    }

    /**
     * Send text (newlines too) to several ids; with $key, a retry within the server's
     * --idempotency-window is not delivered again. Answer: ok, sockets, queued, missing, ...
     *
     * @param string[] $ids
     */
    public function sendMany(array $ids, string $text, ?string $key = null): array
    {
        $fields = ['to' => array_values($ids), 'data' => $text];
        if ($key !== null) {
            $fields['key'] = $key;
        }
        return $this->request('send', $fields);
    }

    public function sendToConnection(string $conn, string $text): void
    {
        if (empty($this->request('send', ['conn' => $conn, 'data' => $text])['ok'])) {
            throw new ClientNotFoundException("no connection $conn");
        }
    }

    public function broadcast(string $text): int
    {
        return (int) $this->request('broadcast', ['data' => $text])['sockets'];
    }

    /** @param string|string[] $channels */
    public function publish(string|array $channels, string $text, ?string $exceptConn = null): int
    {
        $fields = ['channel' => is_array($channels) ? array_values($channels) : $channels, 'data' => $text];
        if ($exceptConn !== null) {
            $fields['except'] = $exceptConn;
        }
        return (int) $this->request('publish', $fields)['sockets'];
    }

    // Channels and presence.

    public function join(string $channel, ?string $id = null, ?string $conn = null): int
    {
        return (int) ($this->request('join', ['channel' => $channel] + self::target($id, $conn))['sockets'] ?? 0);
    }

    public function leave(string $channel, ?string $id = null, ?string $conn = null): int
    {
        return (int) ($this->request('leave', ['channel' => $channel] + self::target($id, $conn))['sockets'] ?? 0);
    }

    /** @return array<array{id: string, meta: mixed}> */
    public function presence(string $channel): array
    {
        return $this->request('presence', ['channel' => $channel])['members'];
    }

    public function setMeta(string $id, ?array $meta): bool
    {
        return !empty($this->request('meta', ['id' => $id, 'meta' => $meta])['ok']);
    }

    // What there is.

    /** @return array<array<string, mixed>> every open socket: id, conn, peer, since, ... */
    public function clients(): array
    {
        return $this->request('list')['clients'];
    }

    /**
     * @param string[] $ids
     * @return string[] the ids asked, in order, that have an open socket
     */
    public function online(array $ids): array
    {
        return $this->request('online', ['ids' => array_values($ids)])['online'];
    }

    /** @return array{sockets: int, ids: int} */
    public function count(?string $channel = null): array
    {
        $answer = $this->request('count', $channel === null ? [] : ['channel' => $channel]);
        return ['sockets' => (int) $answer['sockets'], 'ids' => (int) $answer['ids']];
    }

    public function channel(string $channel): array
    {
        return $this->request('channel', ['channel' => $channel])['members'];
    }

    /** @return array<string, int> */
    public function channels(): array
    {
        return $this->request('channels')['channels'];
    }

    /**
     * Where a channel's history is now (wsboard --history): render 'since' into the page,
     * and the page connects with &since=… to get everything published after the render.
     *
     * @return array{epoch: string, offset: int, since: string}
     */
    public function position(string $channel): array
    {
        $answer = $this->request('position', ['channel' => $channel]);
        $epoch = (string) $answer['epoch'];
        $offset = (int) $answer['offset'];
        return ['epoch' => $epoch, 'offset' => $offset, 'since' => "$channel:$epoch:$offset"];
    }

    /**
     * A channel's kept publications: after $since (['epoch' => …, 'offset' => …]), at most
     * $limit of them; without $since, the last $limit.
     *
     * @return array{epoch: string, offset: int, publications: list<array>, gap: bool}
     */
    public function history(string $channel, ?array $since = null, ?int $limit = null): array
    {
        $fields = ['channel' => $channel];
        if ($since !== null) {
            $fields['since'] = ['epoch' => $since['epoch'], 'offset' => $since['offset']];
        }
        if ($limit !== null) {
            $fields['limit'] = $limit;
        }
        $answer = $this->request('history', $fields);
        unset($answer['ok']);
        return $answer;
    }

    public function stats(): array
    {
        $answer = $this->request('stats');
        unset($answer['ok']);
        return $answer;
    }

    public function ping(): bool
    {
        return $this->line('PING') === 'PONG';
    }

    public function kick(string $id, int $code = 4000, string $reason = 'kicked'): int
    {
        return (int) ($this->request('kick', ['id' => $id, 'code' => $code, 'reason' => $reason])['sockets'] ?? 0);
    }

    public function kickConnection(string $conn, int $code = 4000, string $reason = 'kicked'): void
    {
        if (empty($this->request('kick', ['conn' => $conn, 'code' => $code, 'reason' => $reason])['ok'])) {
            throw new ClientNotFoundException("no connection $conn");
        }
    }

    /**
     * Events as they happen (connect, disconnect, message, join, leave); this connection is
     * the watch's from then on, and waits without a timeout between events.
     *
     * @return \Generator<int, array<string, mixed>>
     */
    public function watch(): \Generator
    {
        $this->request('watch');  // at once: events from now on are kept for the generator
        return $this->events();
    }

    /** @return \Generator<int, array<string, mixed>> */
    private function events(): \Generator
    {
        try {
            while (true) {
                yield json_decode($this->readLine(null), true, 512, JSON_THROW_ON_ERROR);
            }
        } finally {
            $this->close();
        }
    }

    // Tokens for signed ids (--secret).

    /** @param string[] $private the private- and presence- channels it covers, in URL order */
    public static function mintToken(string $secret, string $id, int $exp, array $private = []): string
    {
        $message = "$id.$exp";
        foreach ($private as $channel) {
            $message .= "|$channel";
        }
        return hash_hmac('sha256', $message, $secret);
    }

    /**
     * The query string a browser needs to connect as $id (in $channels) for $ttl seconds:
     * ws://HOST:PORT/websocket?<this>.
     *
     * @param string[] $channels
     */
    public static function signedQuery(string $secret, string $id, int $ttl = 3600, array $channels = [], ?int $now = null): string
    {
        $exp = ($now ?? time()) + $ttl;
        $private = array_values(array_filter(
            $channels,
            static fn (string $c): bool => str_starts_with($c, self::PRIVATE_PREFIXES[0]) || str_starts_with($c, self::PRIVATE_PREFIXES[1])
        ));
        $fields = ['id=' . rawurlencode($id)];
        foreach ($channels as $channel) {
            $fields[] = 'channel=' . rawurlencode($channel);
        }
        $fields[] = "exp=$exp";
        $fields[] = 'token=' . self::mintToken($secret, $id, $exp, $private);
        return implode('&', $fields);
    }
}
