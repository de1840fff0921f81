<?php

declare(strict_types=1);

namespace Wsboard\Tests;

use PHPUnit\Framework\TestCase;
use Wsboard\Client;
use Wsboard\Exception\ClientNotFoundException;
use Wsboard\Exception\CommandException;
use Wsboard\Exception\TimeoutException;
use Wsboard\Exception\UnreachableException;

/**
 * Against a real wsboard: tests/test_php_client.py starts it and gives its control socket
 * (WSBOARD_CONTROL) and port (WSBOARD_TEST_PORT).
 */
final class ClientTest extends TestCase
{
    private static int $n = 0;

    private function port(): int
    {
        return (int) getenv('WSBOARD_TEST_PORT');
    }

    private function id(string $name): string
    {
        return $name . '-' . getmypid() . '-' . ++self::$n;
    }

    public function testSendReachesTheBrowserAndAnUnknownIdIsFalse(): void
    {
        $id = $this->id('alice');
        $browser = new Browser($this->port(), "id=$id");
        $board = new Client();
        $this->assertTrue($board->ping());
        $this->assertTrue($board->send($id, 'héllo  with spaces ☃'));
        $this->assertSame('héllo  with spaces ☃', $browser->receive());
        $this->assertFalse($board->send('nobody-' . getmypid(), 'x'));
        $this->assertSame([true, false, true], $board->sendLines([[$id, 'one'], ['nobody', 'two'], [$id, 'three']]));
        $this->assertSame(['one', 'three'], [$browser->receive(), $browser->receive()]);
    }

    public function testEveryOpOfTheProtocolHasAMethod(): void
    {
        $a = $this->id('a');
        $b = $this->id('b');
        $browserA = new Browser($this->port(), "id=$a");
        $browserB = new Browser($this->port(), "id=$b");
        $board = new Client();
        $first = $board->sendMany([$a, 'nobody'], "two\nlines", 'key-' . $a);
        $again = $board->sendMany([$a, 'nobody'], "two\nlines", 'key-' . $a);
        $this->assertSame([1, ['nobody']], [$first['sockets'], $first['missing']]);
        $this->assertTrue($again['duplicate']);
        $this->assertSame("two\nlines", $browserA->receive());
        $room = 'room-' . $a;
        $this->assertSame(1, $board->join($room, $a));
        $this->assertSame(1, $board->join($room, $b));
        $this->assertSame(['sockets' => 2, 'ids' => 2], $board->count($room));
        $this->assertSame(2, $board->publish($room, 'to the room'));
        $this->assertSame(['to the room', 'to the room'], [$browserA->receive(), $browserB->receive()]);
        $this->assertSame(2, $board->channels()[$room]);
        $members = array_column($board->channel($room), 'conn', 'id');
        $this->assertSame(1, $board->publish([$room], 'not to a', $members[$a]));
        $this->assertSame('not to a', $browserB->receive());
        $board->sendToConnection($members[$a], 'just you');
        $this->assertSame('just you', $browserA->receive());
        $this->assertSame(1, $board->leave($room, $b));
        $this->assertSame(0, $board->join($room, 'nobody'));
        $this->assertSame([$b, $a], $board->online([$b, 'nobody', $a]));
        $ids = array_column($board->clients(), 'id');
        $this->assertContains($a, $ids);
        $this->assertGreaterThanOrEqual(2, $board->broadcast('everyone'));
        $this->assertSame('everyone', $browserA->receive());
        $this->assertTrue($board->setMeta($b, ['name' => 'Bob']));
        $presence = 'presence-' . $a;
        $board->join($presence, $b);
        $this->assertSame([['id' => $b, 'meta' => ['name' => 'Bob']]], $board->presence($presence));
        $this->assertArrayHasKey('sockets', $board->stats());
        $this->assertSame(1, $board->kick($b));
        $this->assertSame(0, $board->kick('nobody'));
    }

    public function testAPositionRenderedIntoAPageAndTheChannelsHistory(): void
    {
        $board = new Client();
        $news = $this->id('news');
        $start = $board->position($news);
        $this->assertSame(0, $start['offset']);
        $this->assertSame("$news:{$start['epoch']}:0", $start['since']);
        $board->publish($news, 'first');
        $board->publish($news, 'second');
        $now = $board->position($news);
        $this->assertSame([$start['epoch'], 2], [$now['epoch'], $now['offset']]);
        $page = $board->history($news, $start, 1);
        $this->assertSame([[1, 'first']], array_map(fn($p) => [$p['offset'], $p['data']], $page['publications']));
        $this->assertFalse($page['gap']);
        $this->assertSame(['second'], array_column($board->history($news, null, 1)['publications'], 'data'));
        $this->expectException(CommandException::class);
        $board->history($news, null, 100000);
    }

    public function testFailuresAreDistinctExceptions(): void
    {
        $board = new Client();
        try {
            $board->sendToConnection('1.999999', 'x');
            $this->fail('no exception');
        } catch (ClientNotFoundException $e) {
            $this->assertStringContainsString('1.999999', $e->getMessage());
        }
        $this->expectException(CommandException::class);
        $board->kick('bad/id');
    }

    public function testANewlineInASendIsRefusedBeforeItCanSplitTheLine(): void
    {
        $this->expectException(\InvalidArgumentException::class);
        (new Client())->send('alice', "two\nlines");
    }

    public function testAMissingSocketIsUnreachableNotAFatalError(): void
    {
        $this->expectException(UnreachableException::class);
        (new Client('/nonexistent/wsboard.sock'))->ping();
    }

    public function testASilentServerTimesOut(): void
    {
        $path = sys_get_temp_dir() . '/silent-' . getmypid() . '.sock';
        @unlink($path);
        $server = stream_socket_server("unix://$path");
        $started = microtime(true);
        try {
            (new Client($path, 0.5))->ping();
            $this->fail('no timeout');
        } catch (TimeoutException $e) {
            $this->assertLessThan(2.0, microtime(true) - $started);
        } finally {
            fclose($server);
            unlink($path);
        }
    }

    public function testWatchYieldsEvents(): void
    {
        $id = $this->id('watched');
        $events = (new Client())->watch();
        $browser = new Browser($this->port(), "id=$id");
        $event = $events->current();
        $this->assertSame(['connect', $id], [$event['event'], $event['id']]);
        $browser->close();
        $events->next();
        $this->assertSame(['disconnect', $id], [$events->current()['event'], $events->current()['id']]);
    }

    public function testTokensAreTheServersOwn(): void
    {
        // The same figures as wsboard_client.signed_query(b"s" * 32, "u", 60, [...], now=1000).
        $query = Client::signedQuery(str_repeat('s', 32), 'u', 60, ['news', 'private-a'], 1000);
        $this->assertSame(getenv('WSBOARD_TEST_SIGNED_QUERY'), $query);
    }
}
